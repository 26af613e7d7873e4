"""MAMDR's domain-specific parameters theta_d in the run's checkpoints: the best epoch is
served with its own theta_d, and a resumed run continues from the saved theta_d."""
import keras
import numpy as np
import pytest

from mdmt_tf.models import ModelConfig, build_model
from mdmt_tf.training import callbacks as callbacks_module
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.encoded import EncodedData
from mdmt_tf.training.fit import train

pytestmark = pytest.mark.slow  # end-to-end runs

MODEL = ModelConfig("shared_bottom", {"bottom_units": [8], "tower_units": [4], "embedding_dim": 2, "dropout": 0.2})


# (strategy, granularity): DR alone with full passes; DN + DR with a batch per domain visit
CASES = [("dr", "pass"), ("mamdr", "batch")]


def _config(epochs, strategy, granularity):
    return TrainConfig.from_dict({"epochs": epochs, "batch_size": 128, "patience": 5, "strategy": strategy,
                                  "precision": "float32",
                                  "mamdr": {"inner_lr": 0.05, "granularity": granularity}})


def _theta_d(trainer) -> list[np.ndarray]:
    """theta_d as one array [num_domains, *shape] per domain-specific trainable variable."""
    return [np.array(keras.ops.convert_to_numpy(delta)) for delta in trainer.deltas]


def _state(trainer):
    return ([np.array(v) for v in trainer.net.trainable_variables],
            [np.array(v) for v in trainer.net.non_trainable_variables], _theta_d(trainer))


class _EpochEnds(keras.callbacks.Callback):
    """theta, non-trainable state and theta_d at every epoch end (after that epoch's checkpoint)."""

    def __init__(self):
        super().__init__()
        self.states = []

    def on_epoch_end(self, epoch, logs=None):
        self.states.append(_state(self.model))


class _TrainBegin(keras.callbacks.Callback):
    """The state the first training step of this fit() starts from."""

    def on_train_begin(self, logs=None):
        self.state = _state(self.model)


def _serve(data, state):
    """Test-split scores of theta + theta_d (each sample with its own domain's theta_d)."""
    enc = EncodedData.from_data(data)
    model = build_model(MODEL, enc.schema)
    theta, non_trainable, theta_d = state
    specific = iter(theta_d)
    stacked = [next(specific) if "embedding" not in v.path else None for v in model.trainable_variables]
    for variable, value in zip(model.non_trainable_variables, non_trainable):
        variable.assign(value)
    features, domain = enc.features["test"], enc.domain["test"]
    scores = {task: np.zeros(len(domain), np.float32) for task in enc.schema.tasks}
    for d in range(enc.schema.num_domains):
        for variable, value, delta in zip(model.trainable_variables, theta, stacked):
            variable.assign(value if delta is None else value + delta[d])
        rows = domain == d
        out = model({k: v[rows] for k, v in features.items()}, training=False)
        for task in scores:
            scores[task][rows] = np.asarray(out[task]).reshape(-1)
    return scores


@pytest.mark.parametrize("strategy, granularity", CASES)
def test_the_best_epoch_is_served_with_its_own_theta_d(data, tmp_path, monkeypatch, strategy, granularity):
    """Epoch 1 is made the best (its validation score is reported higher than epoch 2's);
    the served model must be theta_1 + theta_d,1, not theta_1 + theta_d,2."""
    reported = iter([0.9, 0.5])
    real = callbacks_module.evaluate

    def rigged(*args, **kwargs):
        return {**real(*args, **kwargs), "mean_auc": next(reported)}

    monkeypatch.setattr(callbacks_module, "evaluate", rigged)
    ends = _EpochEnds()
    payload = train(MODEL, data, _config(2, strategy, granularity), tmp_path, source="small", verbose=0,
                    export=False, plots=False, save_predictions=True, callbacks=[ends])
    assert payload["best_epoch"] == 1 and payload["epochs_trained"] == 2
    (_, _, theta_d1), (_, _, theta_d2) = ends.states
    assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(theta_d1, theta_d2))  # epoch 2 moved theta_d
    assert all(np.abs(a).max() > 0 for a in theta_d1)
    served = np.load(tmp_path / "test_predictions.npz")
    expected = _serve(data, ends.states[0])
    for task, scores in expected.items():
        np.testing.assert_allclose(served[task], scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy, granularity", CASES)
def test_a_resumed_run_continues_from_the_saved_theta_d(data, tmp_path, strategy, granularity):
    """epochs=1, then the same run with epochs=2 (a resume): the first step of the resumed
    fit starts from epoch 1's theta and theta_d, and the two epochs end where an
    uninterrupted two-epoch run ends."""
    ends = _EpochEnds()
    train(MODEL, data, _config(1, strategy, granularity), tmp_path / "run", source="small", verbose=0,
          export=False, plots=False, callbacks=[ends])
    begin, after = _TrainBegin(), _EpochEnds()
    train(MODEL, data, _config(2, strategy, granularity), tmp_path / "run", source="small", verbose=0,
          export=False, plots=False, callbacks=[begin, after])
    (theta, _, theta_d), = ends.states
    for saved, resumed in zip(theta + theta_d, begin.state[0] + begin.state[2]):
        np.testing.assert_array_equal(resumed, saved)

    whole = _EpochEnds()
    train(MODEL, data, _config(2, strategy, granularity), tmp_path / "whole", source="small", verbose=0,
          export=False, plots=False, callbacks=[whole])
    (theta, _, theta_d), (resumed_theta, _, resumed_theta_d) = whole.states[1], after.states[0]
    for a, b in zip(theta + theta_d, resumed_theta + resumed_theta_d):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
