"""The three tuners (random, bayesian, hyperband), the trial budget of each, and a search
whose every trial fails."""
import csv
import dataclasses

import pytest
import yaml

from mdmt_tf.cli import build_parser, main
from mdmt_tf.data.dataset import make_dataset
from mdmt_tf.errors import ConfigError
from mdmt_tf.tuning import search
from mdmt_tf.tuning.hypermodel import MDMTHyperModel, check_objective
from mdmt_tf.tuning.search import hyperband_schedule, make_tuner, run_search
from tests.tuning.conftest import CONFIG

TINY = {"embedding_dim": 4, "expert_units": "16,8", "tower_units": "8"}  # mmoe: leaves l2, experts, lr free


def _rows(out):
    with open(out / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_trial_budget_of_each_tuner(tuning_data, tmp_path):
    _, encoded = tuning_data
    hypermodel = MDMTHyperModel("mmoe", encoded, CONFIG, fixed=TINY)
    assert [hyperband_schedule(e) for e in (1, 2, 3, 10)] == [1, 2, 6, 30]

    random = make_tuner(hypermodel, "random", tmp_path / "r", None, 0, True, max_epochs=3)
    assert random.oracle.max_trials == 10  # the default for random / bayesian
    bayesian = make_tuner(hypermodel, "bayesian", tmp_path / "b", 9, 0, True, max_epochs=3)
    assert (bayesian.oracle.max_trials, bayesian.oracle.num_initial_points) == (9, 3)  # a random third, then the GP
    whole = make_tuner(hypermodel, "hyperband", tmp_path / "h1", None, 0, True, max_epochs=3)
    assert whole.oracle.max_trials is None and whole.oracle.max_consecutive_failed_trials == 6
    capped = make_tuner(hypermodel, "hyperband", tmp_path / "h2", 4, 0, True, max_epochs=3)
    assert capped.oracle.max_trials == 4 and capped.oracle.max_epochs == 3 and capped.oracle.factor == 3
    with pytest.raises(ConfigError, match="max trials must be >= 1, got 0"):
        make_tuner(hypermodel, "hyperband", tmp_path / "h3", 0, 0, True, max_epochs=3)
    with pytest.raises(ConfigError, match="unknown tuner 'grid'"):
        make_tuner(hypermodel, "grid", tmp_path / "g", 2, 0, True, max_epochs=3)

    tune = build_parser()._subparsers._group_actions[0].choices["tune"]
    (flag,) = [a for a in tune._actions if "--max-trials" in a.option_strings]
    assert flag.default is None and "hyperband: its schedule sets the number of trials from --epochs" in flag.help
    assert "--max-trials caps it" in flag.help and "the whole schedule for hyperband" in flag.help


def test_hyperband_max_trials_caps_the_schedule_and_continues_trials(tuning_data, tmp_path):
    """--epochs 3: a schedule of 6 trials (3 x 1 epoch, the best continued to 3 epochs, 2 x 3
    epochs); --max-trials 4 stops it after the first successive-halving step."""
    _, encoded = tuning_data
    config = dataclasses.replace(CONFIG, epochs=3)
    best = run_search("mmoe", encoded, config, tmp_path / "hb", kind="hyperband", max_trials=4, fixed=TINY)
    rows = _rows(tmp_path / "hb")
    assert len(rows) == 4 < hyperband_schedule(3) and all(r["status"] == "COMPLETED" for r in rows)
    assert [int(r["tuner/epochs"]) for r in rows] == [1, 1, 1, 3]
    continued = rows[3]  # round 1 of the bracket: the best of trials 0-2, trained on from epoch 1 to 3
    assert continued["tuner/trial_id"] in {r["trial"] for r in rows[:3]} and continued["tuner/initial_epoch"] == "1"
    parent = next(r for r in rows[:3] if r["trial"] == continued["tuner/trial_id"])
    assert parent["val_mean_auc"] == str(max(float(r["val_mean_auc"]) for r in rows[:3]))
    # Hyperband's bookkeeping stays out of the best configuration; its epochs are the budget
    assert not any(k.startswith("tuner/") for k in best["params"]) and best["params"]["expert_units"] == [16, 8]
    winner = next(r for r in rows if r["trial"] == best["objective"]["trial"])
    assert best["train"]["epochs"] == int(winner["tuner/epochs"])
    assert yaml.safe_load((tmp_path / "hb" / "best_hparams.yaml").read_text()) == best


def test_hyperband_without_max_trials_runs_its_whole_schedule(tuning_data, tmp_path):
    _, encoded = tuning_data
    best = run_search("mmoe", encoded, CONFIG, tmp_path / "hb", kind="hyperband", fixed=TINY)  # CONFIG: 2 epochs
    rows = _rows(tmp_path / "hb")
    assert len(rows) == hyperband_schedule(2) == 2
    assert all(r["status"] == "COMPLETED" and r["tuner/epochs"] == "2" for r in rows)
    assert best["train"]["epochs"] == 2 and best["objective"]["value"] == max(float(r["val_mean_auc"]) for r in rows)


def test_bayesian_search(tuning_data, tmp_path):
    """3 trials: 2 random initial points, then one proposed by the Gaussian process."""
    _, encoded = tuning_data
    best = run_search("mmoe", encoded, CONFIG, tmp_path / "bo", kind="bayesian", max_trials=3, fixed=TINY)
    rows = _rows(tmp_path / "bo")
    assert len(rows) == 3 and all(r["status"] == "COMPLETED" for r in rows)
    assert best["objective"]["value"] == max(float(r["val_mean_auc"]) for r in rows)
    assert best["objective"]["value"] > 0.5
    assert {r["num_experts"] for r in rows} <= {"2", "4", "6", "8"}


class NoObjective(MDMTHyperModel):
    """Trains without the validation callback: val_mean_auc is never logged, every trial fails."""

    def fit(self, hp, model, *args, **kwargs):
        enc = self.encoded
        head = {k: v[:256] for k, v in enc.features["train"].items()}
        labels = {k: v[:256] for k, v in enc.labels["train"].items()}
        history = model.fit(make_dataset(head, labels, batch_size=256, shuffle=False), epochs=1, verbose=0,
                            shuffle=False)
        check_objective(history.history)
        return history


@pytest.mark.parametrize("trials", [1, 3])
def test_every_trial_failing_is_one_config_error(monkeypatch, tmp_path, capsys, trials):
    """3 trials: Keras Tuner stops the search with its own RuntimeError (3 consecutive
    failures); 1 trial: the search ends normally without a completed trial. Both: one line."""
    monkeypatch.setattr(search, "MDMTHyperModel", NoObjective)
    out = tmp_path / "search"
    status = main(["tune", "--model", "mmoe", "--data", "synthetic:2000", "--out", str(out), "--max-trials",
                   str(trials), "--epochs", "1", "--batch-size", "256", "--precision", "float32",
                   "--fix", "embedding_dim=4", "--fix", "expert_units=16,8"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert status == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"mdmt: error: no trial completed ({'Keras Tuner stopped the search: ' * (trials == 3)}"
                          f"{trials} of {trials} failed)"), err
    assert "first failure, trial 0: mdmt_tf.errors.ConfigError: the objective val_mean_auc was never logged" in err
    assert "Fix: every trial must log val_mean_auc each epoch" in err and "--overwrite" in err
    failed_lines = [line for line in captured.out.splitlines() if " failed: " in line]
    assert len(failed_lines) == trials
    assert failed_lines[0].startswith("[mdmt] trial 0 failed: mdmt_tf.errors.ConfigError")
    rows = _rows(out)  # the table is written before the error, with each trial's reason
    assert len(rows) == trials and all(r["status"] == "FAILED" and "never logged" in r["reason"] for r in rows)
    assert not (out / "best_hparams.yaml").exists()
