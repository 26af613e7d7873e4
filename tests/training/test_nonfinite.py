"""A NaN or infinite prediction never scores a finite AUC (or logloss), and an epoch whose
validation predictions are not finite is the worst epoch for early stopping."""
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.report.metrics import write_metrics
from mdmt_tf.training.callbacks import ResumableEarlyStopping, ValidationMetrics
from mdmt_tf.training.evaluation import auc, evaluate, logloss

DOMAINS, TASKS = ["x", "y"], ["a", "b"]
# x: rows 0-5, y: rows 6-9; y/b has one class only (AUC None)
DOMAIN = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
LABELS = {"a": np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0]), "b": np.array([0, 1, 0, 1, 0, 0, 0, 0, 0, 0])}
# x/a ranks badly (AUC 1/3): a non-finite score sorted last would lift it
PROBS = {"a": np.array([.2, .8, .3, .7, .4, .1, .9, .2, .6, .3]),
         "b": np.array([.1, .7, .2, .6, .3, .4, .2, .1, .3, .2])}
BAD_ROW = 0  # x/a, a positive


def _with(value, row=BAD_ROW, task="a"):
    probs = {t: p.copy() for t, p in PROBS.items()}
    probs[task][row] = value
    return probs


def _strict_loads(text):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "+inf", "-inf"])
def test_a_nonfinite_prediction_makes_its_slice_and_every_mean_over_it_nan(value):
    clean = evaluate(PROBS, LABELS, DOMAIN, DOMAINS, TASKS)
    bad = evaluate(_with(value), LABELS, DOMAIN, DOMAINS, TASKS)
    assert clean["nonfinite_predictions"] == {} and bad["nonfinite_predictions"] == {"x/a": 1}
    assert math.isnan(bad["auc"]["x/a"]) and math.isnan(bad["logloss"]["x/a"])  # NaN, not None
    for key in ("x/b", "y/a", "y/b"):  # the other slices are untouched
        assert bad["auc"][key] == clean["auc"][key] and bad["logloss"][key] == clean["logloss"][key]
    assert clean["auc"]["y/b"] is None and bad["auc"]["y/b"] is None  # one class: still None
    assert all(math.isfinite(clean["auc"][k]) for k in ("x/a", "x/b", "y/a"))
    for key in ("mean_auc", "weighted_auc", "mean_logloss", "weighted_logloss"):
        assert math.isfinite(clean[key]) and math.isnan(bad[key]), key
    assert math.isnan(bad["task_auc"]["a"]) and math.isnan(bad["task_logloss"]["a"])
    assert bad["task_auc"]["b"] == clean["task_auc"]["b"] and bad["task_logloss"]["b"] == clean["task_logloss"]["b"]
    assert math.isnan(bad["domain_auc"]["x"]) and math.isnan(bad["domain_logloss"]["x"])
    # y's mean leaves out the one-class y/b, as before
    assert bad["domain_auc"]["y"] == clean["domain_auc"]["y"] == clean["auc"]["y/a"]
    assert bad["domain_logloss"]["y"] == clean["domain_logloss"]["y"]


def test_auc_and_logloss_of_nonfinite_scores_are_nan():
    y = np.array([1, 0, 1, 0])
    for value in (float("nan"), float("inf"), -float("inf")):
        s = np.array([value, .5, .2, .4])
        assert math.isnan(auc(y, s)) and math.isnan(logloss(y, s))
    assert math.isnan(auc(np.ones(3), [float("nan"), .1, .2]))  # non-finite wins over one class


def test_metrics_json_writes_a_nan_slice_as_null_with_the_count(tmp_path):
    result = evaluate(_with(float("nan"), row=1, task="b"), LABELS, DOMAIN, DOMAINS, TASKS)
    write_metrics(tmp_path / "metrics.json", {"model": "m", "test": result})
    read = _strict_loads((tmp_path / "metrics.json").read_text())["test"]
    assert read["auc"]["x/b"] is None and read["mean_auc"] is None and read["task_auc"]["b"] is None
    assert read["nonfinite_predictions"] == {"x/b": 1}  # what tells it from a one-class slice
    assert read["auc"]["y/b"] is None and "y/b" not in read["nonfinite_predictions"]
    assert read["auc"]["x/a"] == result["auc"]["x/a"]


def test_an_epoch_with_nonfinite_predictions_is_the_worst_epoch(tmp_path):
    """Epochs: NaN predictions, finite, NaN, NaN with patience 2: the NaN epochs are never
    best, each counts against patience, and the finite epoch's weights are restored."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    stopper = ResumableEarlyStopping(tmp_path / "ckpt", tf.train.Checkpoint(model=model), patience=2)
    stopper.set_model(model)
    # NaN on every positive of x/a: sorted last, it would score a perfect x/a
    nan_on_positives = _with(float("nan"), row=np.flatnonzero((LABELS["a"] == 1) & (DOMAIN == 0)))
    epochs = [nan_on_positives, PROBS, nan_on_positives, nan_on_positives]
    served = iter(epochs)
    validation = ValidationMetrics(lambda: (next(served), LABELS, DOMAIN), DOMAINS, TASKS)
    kernel = model.layers[0].kernel
    for epoch in range(len(epochs)):
        kernel.assign(np.full((2, 1), float(epoch + 1), "float32"))  # "epoch k's weights" = k
        logs = {}
        validation.on_epoch_end(epoch, logs)
        assert math.isnan(logs["val_mean_auc"]) == (epoch != 1)
        stopper.on_epoch_end(epoch, logs)
        if epoch == 0:
            assert stopper.state["best"] is None and stopper.state["wait"] == 1
    assert model.stop_training and stopper.state["best_epoch"] == 2 and stopper.state["wait"] == 2
    assert validation.results[0]["nonfinite_predictions"] == {"x/a": 3}
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert [h["val_mean_auc"] for h in state["history"]] == [None, validation.results[1]["mean_auc"], None, None]
    assert stopper.restore_best() == 2
    np.testing.assert_array_equal(kernel.numpy(), np.full((2, 1), 2.0))
