"""`mdmt tune`: a Keras Tuner search over one model family, resumable and distributable.

Outputs in the search directory:
  best_hparams.yaml / .json  {"name", "params", "train", "objective"}: `mdmt train --hparams`
                             reads it; "train" holds the tuned training values and the
                             budget the best trial trained with (epochs, patience, batch_size)
  trials.csv / trials.md     one row per trial: id, status, the tuner process that ran it,
                             val_mean_auc, hyper-parameters, and the reason when a trial failed
  objective.png              val_mean_auc per trial, and the best so far
  trial_log/TUNER_ID.csv     per tuner process (standalone: tuner0; distributed: each worker),
                             the trials it ran and how they ended
  tuner/                     Keras Tuner's state: rerunning continues the search

Number of trials: random and bayesian run `max_trials` (default 10; bayesian samples the
first third at random, then follows its Gaussian process). Hyperband's count follows from
its schedule: one iteration of brackets with max_epochs = the epochs per trial and factor 3
(`hyperband_schedule(epochs)` trials, e.g. 2 for 2 epochs, 6 for 3, 30 for 10); `max_trials`,
when given, caps it (the search stops after that many trials, even inside a bracket).

If every trial fails the search ends with a ConfigError naming the first failure and the
fix, after writing the trials table with each trial's reason. A trial whose val_mean_auc is
NaN (non-finite predictions) fails with that reason (MDMTHyperModel.fit) and is never best.

Distributed (Keras Tuner's chief / worker mode): the chief serves the oracle, workers run
trials; they meet through KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT, and each worker
has its own KERASTUNER_TUNER_ID. The chief writes the outputs once every trial is done.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import keras_tuner as kt
import yaml

from mdmt_tf.compat import hyperband_iteration_trials, keras_tuner_debug
from mdmt_tf.errors import ConfigError
from mdmt_tf.log import LOG
from mdmt_tf.tuning.hypermodel import OBJECTIVE, MDMTHyperModel, split_values

TUNERS = ("random", "bayesian", "hyperband")
DEFAULT_MAX_TRIALS = 10  # random / bayesian when max_trials is None
HYPERBAND_FACTOR = 3
TRIAL_LOG = "trial_log"


def distributed_environment(role: str, oracle_ip: str, oracle_port: int, tuner_id: str | None = None) -> dict:
    """The KERASTUNER_* variables for a chief or a worker."""
    if role not in ("chief", "worker"):
        raise ConfigError(f"distributed role must be 'chief' or 'worker', got {role!r}")
    if role == "worker" and not tuner_id:
        raise ConfigError("a worker needs its own tuner id (e.g. tuner0, tuner1)")
    return {"KERASTUNER_TUNER_ID": "chief" if role == "chief" else tuner_id,
            "KERASTUNER_ORACLE_IP": oracle_ip, "KERASTUNER_ORACLE_PORT": str(oracle_port)}


def hyperband_schedule(max_epochs: int, factor: int = HYPERBAND_FACTOR) -> int:
    """Trials in one Hyperband iteration (Keras Tuner's bracket sizes) for this max_epochs."""
    if max_epochs < 1:
        raise ConfigError(f"hyperband needs epochs >= 1 per trial, got {max_epochs}")
    oracle = kt.oracles.HyperbandOracle(objective=kt.Objective(OBJECTIVE, direction="max"), max_epochs=max_epochs,
                                        factor=factor)
    return hyperband_iteration_trials(oracle)


def trial_budget(kind: str, max_trials: int | None, max_epochs: int) -> int:
    """How many trials a search of this kind runs (at most)."""
    if kind == "hyperband":
        schedule = hyperband_schedule(max_epochs)
        return min(schedule, max_trials) if max_trials else schedule
    return max_trials or DEFAULT_MAX_TRIALS


class _TrialLog(kt.Tuner):
    """Appends `trial_id,status` to <search dir>/trial_log/<tuner id>.csv as each trial this
    process ran ends, before the oracle hears of it (so the chief's report sees every line)."""

    def on_trial_end(self, trial):
        log = Path(self.project_dir).parent / TRIAL_LOG / f"{self.tuner_id}.csv"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(f"{trial.trial_id},{trial.status}\n")
        if str(trial.status) in ("INVALID", "FAILED"):  # one line; the traceback stays in the trial's trial.json
            lines = (trial.message or "").strip().splitlines()
            LOG.info("trial %s failed: %s", trial.trial_id, lines[-1] if lines else trial.status)
        super().on_trial_end(trial)


class RandomSearch(_TrialLog, kt.RandomSearch):
    pass


class BayesianOptimization(_TrialLog, kt.BayesianOptimization):
    pass


class Hyperband(_TrialLog, kt.Hyperband):
    pass


def make_tuner(hypermodel: MDMTHyperModel, kind: str, directory: Path, max_trials: int | None, seed: int,
               overwrite: bool, max_epochs: int):
    """max_trials: the number of trials of random / bayesian (None: DEFAULT_MAX_TRIALS); for
    hyperband a cap on its schedule (None: the whole schedule, see hyperband_schedule)."""
    if kind not in TUNERS:
        raise ConfigError(f"unknown tuner {kind!r}; valid: {list(TUNERS)}")
    if max_trials is not None and max_trials < 1:
        raise ConfigError(f"max trials must be >= 1, got {max_trials}")
    budget = trial_budget(kind, max_trials, max_epochs)
    objective = kt.Objective(OBJECTIVE, direction="max")
    # the search stops only once every trial of its budget has failed
    common = dict(objective=objective, directory=str(directory), project_name="tuner", overwrite=overwrite,
                  seed=seed, max_consecutive_failed_trials=max(3, budget))
    if kind == "random":
        return RandomSearch(hypermodel, max_trials=budget, **common)
    if kind == "bayesian":
        return BayesianOptimization(hypermodel, max_trials=budget, num_initial_points=max(2, budget // 3), **common)
    tuner = Hyperband(hypermodel, max_epochs=max_epochs, factor=HYPERBAND_FACTOR, hyperband_iterations=1, **common)
    if max_trials and isinstance(tuner.oracle, kt.Oracle):  # a worker's oracle is the chief's: the chief caps
        tuner.oracle.max_trials = max_trials
    return tuner


def trial_owners(out: Path) -> dict[str, list[str]]:
    """trial id -> the tuner processes that ran it, from trial_log/ (several: it ran more than once)."""
    owners: dict[str, list[str]] = {}
    for log in sorted((Path(out) / TRIAL_LOG).glob("*.csv")):
        for line in log.read_text().splitlines():
            trial_id = line.split(",")[0].strip()
            if trial_id:
                owners.setdefault(trial_id, []).append(log.stem)
    return owners


def trial_rows(tuner, out: Path | None = None) -> list[dict]:
    owners = trial_owners(out) if out is not None else {}
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        score = trial.score
        message = (getattr(trial, "message", None) or "").strip().splitlines()
        rows.append({"trial": trial_id, "status": str(trial.status), "tuner": "+".join(owners.get(trial_id, [])),
                     OBJECTIVE: score, "hyperparameters": dict(trial.hyperparameters.values),
                     "reason": message[-1][:300] if message and str(trial.status) == "FAILED" else ""})
    return rows


def _fix_for(reason: str) -> str:
    text = reason.lower()
    if "mean auc is nan" in text and "non-finite predictions" in text:
        return ("the model's predictions are NaN or infinite (diverged): lower train.learning_rate "
                "(--fix train.learning_rate=0.001) or its search range, or check the dense inputs for huge values")
    if OBJECTIVE in reason or "objective" in text:
        return (f"every trial must log {OBJECTIVE} each epoch (mdmt_tf.training.callbacks.ValidationMetrics in "
                "MDMTHyperModel.fit): check that the validation split is not empty and that a custom fit keeps "
                "that callback")
    if "memory" in text or "oom" in text or "resourceexhausted" in text:
        return ("lower --batch-size or pin smaller layers with --fix (e.g. --fix expert_units=128,32 "
                "--fix embedding_dim=8)")
    return "fix the cause above (each trial's full traceback is in tuner/trial_*/trial.json)"


def no_best_error(rows: list[dict], out: Path, stopped: bool = False) -> ConfigError:
    """The error of a search without a completed trial: the first failure and its fix."""
    if not rows:
        return ConfigError(f"no trial ran in {out}, so there is no best configuration; rerun with more "
                           "--max-trials (or --overwrite to start afresh)")
    first = next((r for r in rows if r["status"] == "FAILED"), rows[0])
    reason = first["reason"] or first["status"]
    failed = sum(r["status"] == "FAILED" for r in rows)
    how = "Keras Tuner stopped the search: " if stopped else ""
    return ConfigError(f"no trial completed ({how}{failed} of {len(rows)} failed), so there is no best "
                       f"configuration; first failure, trial {first['trial']}: {reason}. Fix: {_fix_for(reason)}; "
                       f"then rerun with --overwrite (each trial's reason: {out / 'trials.csv'})")


def write_trials(rows: list[dict], out: Path) -> None:
    names = sorted({k for r in rows for k in r["hyperparameters"]})
    with open(out / "trials.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", "status", "tuner", OBJECTIVE, *names, "reason"])
        for r in rows:
            writer.writerow([r["trial"], r["status"], r["tuner"], r[OBJECTIVE],
                             *[r["hyperparameters"].get(n) for n in names], r["reason"]])
    from mdmt_tf.report.tables import markdown_table

    table = [[r["trial"], r["status"], r["tuner"], "n/a" if r[OBJECTIVE] is None else f"{r[OBJECTIVE]:.4f}",
              *[_short(r["hyperparameters"].get(n)) for n in names], r["reason"]] for r in rows]
    (out / "trials.md").write_text(markdown_table(["trial", "status", "tuner", OBJECTIVE, *names, "reason"], table)
                                   + "\n")


def write_report(tuner, hypermodel: MDMTHyperModel, out: Path, stopped: bool = False) -> dict:
    """Write the trials table, then (if a trial completed) best_hparams and the plot."""
    from mdmt_tf.report.metrics import clean
    from mdmt_tf.report.plots import tuner_objective

    out = Path(out)
    rows = clean(trial_rows(tuner, out))
    write_trials(rows, out)
    completed = [r for r in rows if r["status"] == "COMPLETED" and r[OBJECTIVE] is not None]
    if not completed:
        raise no_best_error(rows, out, stopped)
    best = max(completed, key=lambda r: r[OBJECTIVE])
    params, train = split_values(best["hyperparameters"])
    c = hypermodel.train_config
    # the budget the best trial trained with (Hyperband: its cumulative epochs), for `mdmt train --hparams`
    train.update(epochs=int(best["hyperparameters"].get("tuner/epochs", c.epochs)), patience=c.patience,
                 batch_size=c.batch_size)
    result = clean({"name": hypermodel.model_name, "params": params, "train": train,
                    "objective": {"name": OBJECTIVE, "value": best[OBJECTIVE], "trial": best["trial"]}})
    (out / "best_hparams.json").write_text(json.dumps(result, indent=1))
    (out / "best_hparams.yaml").write_text(yaml.safe_dump(result, sort_keys=False))
    tuner_objective(rows, OBJECTIVE, out / "objective.png")
    return result


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _is_worker() -> bool:
    role = os.environ.get("KERASTUNER_TUNER_ID", "")
    return bool(role) and "chief" not in role


def run_search(model_name: str, encoded, train_config, out_dir, kind: str = "random", max_trials: int | None = None,
               seed: int = 0, fixed: dict | None = None, overwrite: bool = False, verbose: int = 0) -> dict | None:
    """Run (or continue) a search; returns the best configuration (None on a worker).

    max_trials: see make_tuner (None: 10 trials for random / bayesian, hyperband's whole schedule).
    Raises ConfigError when no trial completed (e.g. every trial failed), after writing trials.csv/md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not _is_worker():
        shutil.rmtree(out / TRIAL_LOG, ignore_errors=True)
    hypermodel = MDMTHyperModel(model_name, encoded, train_config, fixed=fixed, verbose=verbose)
    stopped = False
    with keras_tuner_debug(bool(verbose)):  # a failed trial's traceback only when verbose
        tuner = make_tuner(hypermodel, kind, out, max_trials, seed, overwrite, max_epochs=train_config.epochs)
        try:
            tuner.search()
        except RuntimeError as err:  # keras_tuner's "Number of consecutive failures exceeded the limit"
            if "consecutive failures" not in str(err) or _is_worker():
                raise
            stopped = True
    if _is_worker():
        return None  # a worker: the chief reports
    return write_report(tuner, hypermodel, out, stopped=stopped)
