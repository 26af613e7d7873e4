"""`mdmt tune`: a Keras Tuner search over one model family, resumable and distributable.

Outputs in the search directory:
  best_hparams.yaml / .json  {"name", "params", "train", "objective"}: `mdmt train --hparams`
                             reads it
  trials.csv / trials.md     one row per trial: id, status, val_mean_auc, hyper-parameters,
                             and the reason when a trial failed
  objective.png              val_mean_auc per trial, and the best so far
  tuner/                     Keras Tuner's state: rerunning continues the search

Distributed (Keras Tuner's chief / worker mode): the chief serves the oracle, workers run
trials; they meet through KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT, and each worker
has its own KERASTUNER_TUNER_ID. The chief writes the outputs once every trial is done.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import keras_tuner as kt
import yaml

from mdmt_tf.errors import ConfigError
from mdmt_tf.tuning.hypermodel import OBJECTIVE, MDMTHyperModel, split_values

TUNERS = ("random", "bayesian", "hyperband")


def distributed_environment(role: str, oracle_ip: str, oracle_port: int, tuner_id: str | None = None) -> dict:
    """The KERASTUNER_* variables for a chief or a worker."""
    if role not in ("chief", "worker"):
        raise ConfigError(f"distributed role must be 'chief' or 'worker', got {role!r}")
    if role == "worker" and not tuner_id:
        raise ConfigError("a worker needs its own tuner id (e.g. tuner0, tuner1)")
    return {"KERASTUNER_TUNER_ID": "chief" if role == "chief" else tuner_id,
            "KERASTUNER_ORACLE_IP": oracle_ip, "KERASTUNER_ORACLE_PORT": str(oracle_port)}


def make_tuner(hypermodel: MDMTHyperModel, kind: str, directory: Path, max_trials: int, seed: int,
               overwrite: bool, max_epochs: int):
    if kind not in TUNERS:
        raise ConfigError(f"unknown tuner {kind!r}; valid: {list(TUNERS)}")
    if max_trials < 1:
        raise ConfigError(f"max trials must be >= 1, got {max_trials}")
    objective = kt.Objective(OBJECTIVE, direction="max")
    common = dict(objective=objective, directory=str(directory), project_name="tuner", overwrite=overwrite,
                  seed=seed, max_consecutive_failed_trials=max(3, max_trials))
    if kind == "random":
        return kt.RandomSearch(hypermodel, max_trials=max_trials, **common)
    if kind == "bayesian":
        return kt.BayesianOptimization(hypermodel, max_trials=max_trials, **common)
    return kt.Hyperband(hypermodel, max_epochs=max_epochs, **common)


def trial_rows(tuner) -> list[dict]:
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        score = trial.score
        message = (getattr(trial, "message", None) or "").strip().splitlines()
        rows.append({"trial": trial_id, "status": str(trial.status), OBJECTIVE: score,
                     "hyperparameters": dict(trial.hyperparameters.values),
                     "reason": message[-1][:300] if message and str(trial.status) == "FAILED" else ""})
    return rows


def write_report(tuner, hypermodel: MDMTHyperModel, out: Path) -> dict:
    from mdmt_tf.report.plots import tuner_objective
    from mdmt_tf.report.tables import markdown_table

    from mdmt_tf.report.metrics import clean

    rows = clean(trial_rows(tuner))
    completed = [r for r in rows if r["status"] == "COMPLETED" and r[OBJECTIVE] is not None]
    if not completed:
        reasons = "; ".join(f"trial {r['trial']}: {r['reason'] or r['status']}" for r in rows) or "no trials ran"
        raise ConfigError(f"no trial completed, so there is no best configuration ({reasons})")
    best = max(completed, key=lambda r: r[OBJECTIVE])
    params, train = split_values(best["hyperparameters"])
    result = clean({"name": hypermodel.model_name, "params": params, "train": train,
                    "objective": {"name": OBJECTIVE, "value": best[OBJECTIVE], "trial": best["trial"]}})
    (out / "best_hparams.json").write_text(json.dumps(result, indent=1))
    (out / "best_hparams.yaml").write_text(yaml.safe_dump(result, sort_keys=False))
    names = sorted({k for r in rows for k in r["hyperparameters"]})
    with open(out / "trials.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", "status", OBJECTIVE, *names, "reason"])
        for r in rows:
            writer.writerow([r["trial"], r["status"], r[OBJECTIVE], *[r["hyperparameters"].get(n) for n in names],
                             r["reason"]])
    table = [[r["trial"], r["status"], "n/a" if r[OBJECTIVE] is None else f"{r[OBJECTIVE]:.4f}",
              *[_short(r["hyperparameters"].get(n)) for n in names], r["reason"]] for r in rows]
    (out / "trials.md").write_text(markdown_table(["trial", "status", OBJECTIVE, *names, "reason"], table) + "\n")
    tuner_objective(rows, OBJECTIVE, out / "objective.png")
    return result


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_search(model_name: str, encoded, train_config, out_dir, kind: str = "random", max_trials: int = 10,
               seed: int = 0, fixed: dict | None = None, overwrite: bool = False, verbose: int = 0) -> dict | None:
    """Run (or continue) a search; returns the best configuration (None on a worker)."""
    import keras

    from mdmt_tf.training.fit import resolve_precision

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hypermodel = MDMTHyperModel(model_name, encoded, train_config, fixed=fixed, verbose=verbose)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(resolve_precision(train_config.precision))
    try:
        tuner = make_tuner(hypermodel, kind, out, max_trials, seed, overwrite, max_epochs=train_config.epochs)
        tuner.search()
    finally:
        keras.mixed_precision.set_global_policy(previous)
    role = os.environ.get("KERASTUNER_TUNER_ID", "")
    if role and "chief" not in role:
        return None  # a worker: the chief reports
    return write_report(tuner, hypermodel, out)
