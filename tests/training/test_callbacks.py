"""Early stopping with best-weights restore (ResumableEarlyStopping), driven epoch by epoch."""
import json

import keras
import numpy as np
import tensorflow as tf

from mdmt_tf.training.callbacks import ResumableEarlyStopping


def _stopper(tmp_path, patience):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    stopper = ResumableEarlyStopping(tmp_path / "ckpt", tf.train.Checkpoint(model=model), patience=patience)
    stopper.set_model(model)
    return model, stopper


def test_stops_after_patience_and_restores_the_best_epochs_weights(tmp_path):
    model, stopper = _stopper(tmp_path, patience=2)
    kernel = model.layers[0].kernel
    for epoch, auc in enumerate([0.60, 0.70, 0.65, 0.64, 0.99]):
        kernel.assign(np.full((2, 1), float(epoch + 1), "float32"))  # "epoch k's weights" = k
        model.stop_training = False
        stopper.on_epoch_end(epoch, {"val_mean_auc": auc})
        if model.stop_training:
            break
    assert epoch == 3  # two epochs without improvement after the best (epoch 2)
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["stopped_early"] and state["best_epoch"] == 2 and state["best"] == 0.70 and state["epoch"] == 4
    assert [h["val_mean_auc"] for h in state["history"]] == [0.60, 0.70, 0.65, 0.64]
    assert stopper.restore_best() == 2
    np.testing.assert_array_equal(kernel.numpy(), np.full((2, 1), 2.0))


def test_a_nan_monitor_never_counts_as_best_and_resume_restores_the_last_epoch(tmp_path):
    model, stopper = _stopper(tmp_path, patience=5)
    kernel = model.layers[0].kernel
    for epoch, auc in enumerate([0.6, float("nan"), 0.5]):
        kernel.assign(np.full((2, 1), float(epoch + 1), "float32"))
        stopper.on_epoch_end(epoch, {"val_mean_auc": auc})
    assert stopper.state["best_epoch"] == 1 and stopper.state["wait"] == 2
    assert not getattr(model, "stop_training", False)

    again_model, again = _stopper(tmp_path, patience=5)
    state = again.resume()
    assert state["epoch"] == 3
    np.testing.assert_array_equal(again_model.layers[0].kernel.numpy(), np.full((2, 1), 3.0))
