"""What a finished training run leaves in its directory: metrics.json (the evaluation of the
best weights on the validation and test splits), the SavedModel, test predictions and plots."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mdmt_tf.models import ModelConfig
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.encoded import SplitData
from mdmt_tf.training.evaluation import evaluate
from mdmt_tf.training.predict import forward_details


@dataclasses.dataclass
class Trained:
    """A finished training, at its best epoch's weights."""

    model: keras.Model      # the MDMTModel, float32 weights
    serving: keras.Model    # what is evaluated: the model, or theta + theta_d per domain (MAMDR's DR)
    exported: keras.Model   # what is exported: `serving`, or its copy in the serving precision
    state: dict             # the early-stopping state (epoch, best, history...)
    best_epoch: int | None
    trajectory: list[dict]  # architecture values over training
    train_seconds: float
    train_examples: float
    steps: dict             # the trainer's steps_taken()
    replicas: int
    balance: dict | None = None  # loss balancing: {method, unit, units, weights} at the end


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Who the run is: its configuration and where its outputs go."""

    model_config: ModelConfig
    config: TrainConfig
    out: Path
    model_dir: Path
    source: str = ""
    export: bool = True
    plots: bool = True
    save_predictions: bool = False


def finish(trained: Trained, enc: SplitData, run: RunInfo) -> dict:
    """Evaluate, export, write metrics.json (and plots); returns the metrics payload."""
    from mdmt_tf.export.savedmodel import export_savedmodel
    from mdmt_tf.report.metrics import arch_summary, write_metrics

    c, out = run.config, run.out
    domains, tasks = enc.domains, list(enc.spec.tasks)
    score = enc.scorer(trained.serving, c.eval_batch_size)
    scored = {s: score(s) for s in ("val", "test")}
    predictions = {s: scored[s][0] for s in scored}
    results = {s: evaluate(scored[s][0], scored[s][1], scored[s][2], domains, tasks) for s in scored}
    if run.save_predictions:
        np.savez_compressed(out / "test_predictions.npz", **predictions["test"])
    served = _serving_check(trained, enc, c, predictions["test"])
    if run.export:
        export_savedmodel(trained.exported, enc.front, enc.spec, run.model_dir, warmup_examples=enc.warmup,
                          metadata={"model": run.model_config.to_dict(), "domains": domains,
                                    "serving_precision": c.serving_precision})
    state, seconds = trained.state, trained.train_seconds
    payload = {
        "model": run.model_config.name,
        "val": results["val"], "test": results["test"],
        "arch": arch_summary(trained.model.architecture_values(), domains, tasks),
        "train_seconds": seconds,
        "train_examples_per_second": trained.train_examples / seconds if seconds else None,
        "epochs_trained": state["epoch"], "best_epoch": trained.best_epoch, "stopped_early": state.get("stopped_early"),
        "steps": trained.steps, "serving": served, "replicas": trained.replicas,
        **({"balance": trained.balance} if trained.balance is not None else {}),
        "history": state["history"], "config": c.to_dict(),
        "model_config": {"name": run.model_config.name, "params": run.model_config.resolved_params()},
        "data": {"source": run.source, "rows": {s: enc.rows(s) for s in ("train", "val", "test")},
                 "domains": domains, "tasks": tasks},
    }
    payload = write_metrics(out / "metrics.json", payload)
    if run.plots:
        write_plots(payload, trained, enc, out / "plots", c.eval_batch_size)
    return payload


def _serving_check(trained: Trained, enc: SplitData, c: TrainConfig, test_predictions: dict) -> dict:
    """The serving precision; for an export in another precision than the evaluation's, its own
    test metrics and its largest difference from the evaluated scores."""
    served: dict[str, Any] = {"precision": c.serving_precision}
    if trained.exported is trained.serving:
        return served
    domains, tasks = enc.domains, list(enc.spec.tasks)
    test, labels, domain = enc.scorer(trained.exported, c.eval_batch_size)("test")
    check = evaluate(test, labels, domain, domains, tasks)
    served.update(test_mean_auc=check["mean_auc"], test_mean_logloss=check["mean_logloss"],
                  test_max_abs_diff=max(float(np.max(np.abs(test[t] - test_predictions[t]))) for t in tasks))
    return served


def write_plots(payload: dict, trained: Trained, enc: SplitData, directory: Path, batch_size: int) -> None:
    """auc_heatmap, training_curves, arch_trajectories and the gate plots of the validation split."""
    from mdmt_tf.report import plots

    domains, tasks = enc.domains, list(enc.spec.tasks)
    directory.mkdir(parents=True, exist_ok=True)
    plots.auc_heatmap(payload["test"], domains, tasks, directory / "auc_heatmap.png")
    if trained.state["history"]:
        plots.training_curves(trained.state["history"], directory / "training_curves.png")
    plots.arch_trajectories(trained.trajectory, directory / "arch_trajectories.png")
    if trained.balance is not None:
        plots.balance_weights(trained.balance, directory / "balance_weights.png")
    sample = enc.sample("val")
    details = forward_details(trained.model, sample, batch_size)
    if details is None:
        return
    domain = sample[enc.spec.domain]
    gates = {gate.name: gate.weights for gate in details.gates}
    plots.gate_utilisation(gates, domain, domains, tasks, directory / "gate_utilisation.png")
    scalings = {scaling.name: scaling.values for scaling in details.scalings}
    if scalings:
        plots.gate_nu(scalings, domain, domains, tasks, directory / "gate_nu.png")
