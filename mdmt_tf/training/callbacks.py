"""Callbacks of `mdmt train`: exact validation metrics, architecture trajectories, and
early stopping that survives an interruption (checkpoints and state on disk)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np

from mdmt_tf.errors import ConfigError
from mdmt_tf.files import read_json, write_json
from mdmt_tf.training.evaluation import evaluate


class ValidationMetrics(keras.callbacks.Callback):
    """At each epoch end, score the whole validation split and put `val_mean_auc`,
    `val_mean_logloss` and `val_weighted_auc` into the logs (so early stopping,
    TensorBoard, Keras Tuner and the history see them); `results` keeps every epoch's
    full evaluation (per-pair AUC and logloss, nonfinite_predictions). A value is NaN when
    a prediction it covers is NaN or infinite (training.evaluation), or when no pair has
    both classes."""

    def __init__(self, score, domains, tasks):
        """score() -> ({task: probabilities}, {task: labels}, domain indices) of the validation
        split now (EncodedData / StreamData `scored("val", model, batch_size)`)."""
        super().__init__()
        self.score = score
        self.domains, self.tasks = list(domains), list(tasks)
        self.results: list[dict] = []

    @classmethod
    def of(cls, model, data, batch_size: int) -> "ValidationMetrics":
        """Scoring `model` on `data`'s validation split (in memory or streamed)."""
        score = data.scorer(model, batch_size)
        return cls(lambda: score("val"), data.domains, data.spec.tasks)

    def on_epoch_end(self, epoch, logs=None):
        probs, labels, domain = self.score()
        result = evaluate(probs, labels, domain, self.domains, self.tasks)
        self.results.append(result)
        if logs is not None:
            logs["val_mean_auc"] = _log_value(result["mean_auc"])
            logs["val_mean_logloss"] = _log_value(result["mean_logloss"])
            logs["val_weighted_auc"] = _log_value(result["weighted_auc"])


class ArchitectureTrajectory(keras.callbacks.Callback):
    """Records the model's fusion weights (sigmoid(alpha), sigmoid(beta): ArchValues, by key
    such as "alpha/domain") at the start and after every `every_steps` training steps and
    every epoch."""

    def __init__(self, net, every_steps: int = 50):
        super().__init__()
        self.net, self.every_steps = net, max(1, int(every_steps))
        self.points: list[dict] = []  # {"step", "epoch", values...}
        self._step = 0
        self._epoch = 0

    def _record(self):
        values = {v.key: np.asarray(v.value).tolist() for v in self.net.architecture_values()
                  if v.kind in ("alpha", "beta")}
        if values:
            self.points.append({"step": self._step, "epoch": self._epoch, **values})

    def on_train_begin(self, logs=None):
        if not self.points:
            self._record()
        else:
            self._step = self.points[-1]["step"]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_steps == 0:
            self._record()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        if not self.points or self.points[-1]["step"] != self._step:
            self._record()


class BalanceTrajectory(keras.callbacks.Callback):
    """Records each unit's loss-balancing weight (LossBalance.weights_now) at the start and at
    every epoch end: points {"epoch", "weights": [per unit]}."""

    def __init__(self, balance):
        super().__init__()
        self.balance = balance
        self.points: list[dict] = []

    def on_train_begin(self, logs=None):
        if not self.points:
            self.points.append({"epoch": 0, "weights": self.balance.weights_now()})

    def on_epoch_end(self, epoch, logs=None):
        self.points.append({"epoch": epoch + 1, "weights": self.balance.weights_now()})


class ResumableEarlyStopping(keras.callbacks.Callback):
    """Early stopping on a monitored value (max) with best-weights restore, plus the
    per-epoch checkpoint that lets an interrupted run resume.

    Each epoch end: write `checkpoints/last` (everything `checkpoint` tracks: model,
    optimizers, step counters), `checkpoints/best` when the monitor improves, and
    `checkpoints/state.json` (epoch, best value, patience counter, history). At train end
    the best checkpoint's weights are restored. A NaN (or missing) monitor value is the
    worst epoch: it never becomes best and counts against patience, also as the first
    epoch (unlike keras.callbacks.EarlyStopping, which keeps a NaN first epoch as its best).
    """

    def __init__(self, directory: Path, checkpoint, monitor: str = "val_mean_auc", patience: int = 3,
                 extra_state=None, resume_from: Path | None = None):
        super().__init__()
        import tensorflow as tf

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # where an interrupted run resumes from: its own directory, or (a non-chief worker of a
        # multi-worker run) the chief's, so that every worker restarts at the same epoch
        self.resume_from = Path(resume_from) if resume_from is not None else self.directory
        self.checkpoint = checkpoint
        # two kept: a crash between a checkpoint and its state.json leaves the state's epoch restorable
        self.last = tf.train.CheckpointManager(checkpoint, str(self.directory / "last"), max_to_keep=2)
        self.best_manager = tf.train.CheckpointManager(checkpoint, str(self.directory / "best"), max_to_keep=1)
        self.monitor, self.patience = monitor, int(patience)
        self.extra_state: Callable[[], dict] = extra_state or dict
        self.state: dict[str, Any] = {"epoch": 0, "best": None, "best_epoch": None, "wait": 0, "history": [],
                                      "stopped_early": False}

    @property
    def state_file(self) -> Path:
        return self.directory / "state.json"

    def resume(self) -> dict | None:
        """Restore the checkpoint of the epoch that `resume_from`'s state.json records (the
        state is written after its checkpoint); returns the state, or None for a fresh run."""
        import tensorflow as tf

        state_file = self.resume_from / "state.json"
        if not state_file.exists():
            return None
        state = read_json(state_file)
        path = str(self.resume_from / "last" / f"ckpt-{state['epoch']}")
        if tf.train.get_checkpoint_state(str(self.resume_from / "last")) is None or not tf.io.gfile.glob(
                path + ".index"):
            raise ConfigError(f"{state_file} records epoch {state['epoch']} but {path} is missing: the run's "
                              "checkpoints are incomplete; start a new run with another --out")
        self.state = state
        self.checkpoint.restore(path).assert_existing_objects_matched()
        return self.state

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        value = logs.get(self.monitor)
        self.state["history"].append({"epoch": epoch + 1, **{k: _number(v) for k, v in logs.items()}})
        improved = value is not None and not math.isnan(value) and (
            self.state["best"] is None or value > self.state["best"])
        if improved:
            self.state.update(best=float(value), best_epoch=epoch + 1, wait=0)
            self.best_manager.save(checkpoint_number=epoch + 1)
        else:
            self.state["wait"] += 1
        self.state["epoch"] = epoch + 1
        self.last.save(checkpoint_number=epoch + 1)
        self._write_state()
        if self.state["wait"] >= self.patience:
            self.state["stopped_early"] = True
            self._write_state()
            self.model.stop_training = True

    def _write_state(self):
        self.state.update(self.extra_state())
        write_json(self.state_file, self.state)

    def restore_best(self) -> int | None:
        """Load the best checkpoint (if any); returns its epoch."""
        if self.best_manager.latest_checkpoint is None:
            return None
        self.checkpoint.restore(self.best_manager.latest_checkpoint).expect_partial()
        return self.state["best_epoch"]


def _log_value(value) -> float:
    return float("nan") if value is None else float(value)


def _number(value):
    if value is None:
        return None
    value = float(np.asarray(value))
    return None if math.isnan(value) else value
