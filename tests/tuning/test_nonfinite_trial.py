"""A trial whose validation mean AUC is NaN (non-finite predictions) fails with the reason
and is never the best."""
import csv
import dataclasses

import numpy as np
import pytest

import mdmt_tf.training.predict as predict_module
from mdmt_tf.errors import ConfigError
from mdmt_tf.tuning.search import run_search
from tests.tuning.conftest import CONFIG

TINY = {"embedding_dim": 4, "expert_units": "16,8", "tower_units": "8", "gating": "softmax", "dselect_k": 1,
        "dselect_entropy": 0.0, "train.loss_balance": "none"}
ONE_EPOCH = dataclasses.replace(CONFIG, epochs=1)


def _poison(monkeypatch, encoded, poisoned_fits):
    """The validation predictor of the fits numbered in `poisoned_fits` (1-based) returns NaN
    for the first task on every row of domain 0."""
    real, fits = predict_module.predictor, []
    task, column = encoded.spec.tasks[0], encoded.spec.domain

    def predictor(model, batch_size):
        predict = real(model, batch_size)
        fits.append(model)
        poisoned = len(fits) in poisoned_fits

        def wrapped(features):
            probs = predict(features)
            if poisoned:
                probs[task][np.asarray(features[column]).ravel() == 0] = np.nan
            return probs
        return wrapped

    monkeypatch.setattr(predict_module, "predictor", predictor)
    rows = int((np.asarray(encoded.domain["val"]).ravel() == 0).sum())
    return f"validation mean AUC is NaN: non-finite predictions in {encoded.domains[0]}/{task} ({rows} rows)"


def test_a_nan_trial_fails_with_its_reason_and_is_never_best(tuning_data, tmp_path, monkeypatch):
    _, encoded = tuning_data
    reason = _poison(monkeypatch, encoded, poisoned_fits={1})
    best = run_search("mmoe", encoded, ONE_EPOCH, tmp_path / "search", max_trials=2, fixed=TINY)
    with open(tmp_path / "search" / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["FAILED", "COMPLETED"]
    assert rows[0]["reason"] == f"mdmt_tf.errors.ConfigError: {reason}" and rows[0]["val_mean_auc"] == ""
    assert best["objective"]["trial"] == rows[1]["trial"] and best["objective"]["value"] > 0.5


def test_a_search_of_nan_trials_ends_with_the_reason_and_a_fix(tuning_data, tmp_path, monkeypatch):
    _, encoded = tuning_data
    reason = _poison(monkeypatch, encoded, poisoned_fits={1})
    with pytest.raises(ConfigError) as info:
        run_search("mmoe", encoded, ONE_EPOCH, tmp_path / "search", max_trials=1, fixed=TINY)
    message = str(info.value)
    assert f"first failure, trial 0: mdmt_tf.errors.ConfigError: {reason}" in message
    assert "Fix: the model's predictions are NaN or infinite" in message
    assert not (tmp_path / "search" / "best_hparams.yaml").exists()
