"""A training run behind `mdmt train`: data -> front -> model -> trainer -> fit -> best
weights -> evaluation -> SavedModel -> metrics.json and plots (the pieces: config,
runtime, encoded, factory, outputs).

A run directory holds:
  run_config.json   model, training and data configuration (a rerun must match it)
  checkpoints/      last + best checkpoints and state.json: rerunning resumes from them
  logs/             TensorBoard
  model/            the SavedModel (serving_default, predict_raw)
  metrics.json      see mdmt_tf.report.metrics
  plots/            auc_heatmap.png, training_curves.png, arch_trajectories.png,
                    gate_utilisation.png (gate_nu.png for PEPNet)
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import keras
import tensorflow as tf

from mdmt_tf.data.checks import check_cascade
from mdmt_tf.data.dataset import MDMTData
from mdmt_tf.data.stream import StreamedSplits
from mdmt_tf.errors import ConfigError
from mdmt_tf.files import read_json, write_json
from mdmt_tf.log import LOG
from mdmt_tf.models import ModelConfig, build_model
from mdmt_tf.training.callbacks import (
    ArchitectureTrajectory,
    BalanceTrajectory,
    ResumableEarlyStopping,
    ValidationMetrics,
)
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.encoded import EncodedData, SplitData
from mdmt_tf.training.factory import make_trainer
from mdmt_tf.training.outputs import RunInfo, Trained, finish
from mdmt_tf.training.runtime import distribution_strategy, is_chief, resolve_precision


def _diff(old, new, prefix=""):
    """(dotted key, old, new) for every leaf that differs between two JSON-like dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _diff(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip("."), old, new


def _with_defaults(values: dict, defaults: dict) -> dict:
    """`values` with every key it lacks (at any depth, e.g. train.mamdr.granularity) taken from `defaults`."""
    out = dict(values)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(default, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], default)
    return out


class _Timer(keras.callbacks.Callback):
    """Wall time and examples of the training steps (validation excluded)."""

    def __init__(self, examples_per_step: float, seconds: float = 0.0, examples: float = 0):
        super().__init__()
        self.examples_per_step, self.seconds, self.examples = examples_per_step, seconds, examples

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += time.perf_counter() - self._start
        self.examples += self._steps * self.examples_per_step


class Run:
    """One training run in one directory (see the module doc)."""

    def __init__(self, model_config: ModelConfig, data: "MDMTData | EncodedData | StreamedSplits", config: TrainConfig,
                 out_dir: str | Path, source: str = "", verbose: int | None = None, callbacks=(),
                 export: bool = True, plots: bool = True, save_predictions: bool = False,
                 model_dir: str | Path | None = None, strategy=None):
        self.model_config, self.config = model_config, config
        # EncodedData in memory, or StreamedSplits streamed from files: the same interface here
        self.encoded = data if isinstance(data, (EncodedData, StreamedSplits)) else None
        self.data: MDMTData | None = data if isinstance(data, MDMTData) else None
        self.out = Path(out_dir)
        self.resume_dir = self.out / "checkpoints"  # the chief's checkpoints, which every worker resumes from
        self.model_dir = Path(model_dir) if model_dir is not None else self.out / "model"
        self.source = source
        self.export, self.plots, self.save_predictions = export, plots, save_predictions
        self.verbose = verbose if verbose is not None else (1 if sys.stdout.isatty() else 2)
        self.extra_callbacks = list(callbacks)
        # a tf.distribute strategy made by the caller (before any TF op of its own, e.g. a
        # streamed scan: collective ops must be configured at program startup); else made in run()
        self._strategy = strategy

    # ------------------------------------------------------------------ config
    # a rerun may change these (e.g. more epochs to continue a run); anything else must match
    RESUMABLE_CHANGES = ("train.epochs", "train.patience", "train.eval_batch_size", "train.serving_precision")

    def _check_run_config(self) -> None:
        current = json.loads(json.dumps(
            {"model": self.model_config.to_dict(), "train": self.config.to_dict(), "data": self.source}))
        path = self.out / "run_config.json"
        if path.exists():
            previous = read_json(path)
            # settings added by a newer version are absent from older runs: read them as their defaults
            defaults = json.loads(json.dumps(TrainConfig().to_dict()))
            previous["train"] = _with_defaults(previous.get("train", {}), defaults)
            differs = [f"{key}: {old!r} -> {new!r}" for key, old, new in _diff(previous, current)
                       if key not in self.RESUMABLE_CHANGES]
            if differs:
                raise ConfigError(f"{self.out} holds a run with another configuration ({'; '.join(differs[:5])}); "
                                  "pass another --out (or delete the directory) to start a new run")
        write_json(path, current)

    def _data_seed(self) -> int:
        """The shuffling seed: the configured one for a fresh run; for a run resuming after
        epoch k one derived from (seed, k), so it does not replay the first epochs' orders
        (tf.data's per-iteration reshuffling restarts with a new dataset). A resumed run is
        therefore not bit-identical to an uninterrupted one."""
        state = self.resume_dir / "state.json"
        epoch = read_json(state).get("epoch", 0) if state.exists() else 0
        return self.config.seed if epoch == 0 else self.config.seed * 1_000_003 + 7919 * epoch

    def _trainer(self, model, enc: SplitData):
        """(trainer, training batches, steps per epoch, examples per step): see factory.make_trainer."""
        setup = make_trainer(model, enc, self.config, self._data_seed())
        return setup.trainer, setup.train, setup.steps_per_epoch, setup.examples_per_step

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        self.strategy = self._strategy or distribution_strategy(self.config.distribute)  # before any other TF op
        self.chief = self.strategy is None or is_chief(self.strategy)
        # every worker checkpoints (collectively), each into its own directory; all resume from
        # the chief's (self.resume_dir, a shared directory), so after a failure they restart at
        # the same epoch with the same data order
        if not self.chief:
            index = self.strategy.cluster_resolver.task_id
            self.out = self.out / "workers" / f"{self.strategy.cluster_resolver.task_type}-{index}"
            self.export = self.plots = False
        # a cascade (ESMM) needs nested training labels: checked before the run directory is written
        if self.data is not None:
            check_cascade(self.model_config, self.data.spec.tasks, self.data.labels("train"), self.data)
        elif isinstance(self.encoded, StreamedSplits):
            self.encoded.check_cascade(self.model_config)
        elif self.encoded is not None:
            check_cascade(self.model_config, self.encoded.spec.tasks, self.encoded.labels["train"])
        _check_stages(self.model_config, self.config)
        self._check_run_config()
        keras.utils.set_random_seed(self.config.seed)
        return self._run()

    def _run(self) -> dict:
        c, out = self.config, self.out
        if self.encoded is not None:
            enc = self.encoded
        elif self.data is not None:
            enc = EncodedData.from_data(self.data)
        else:
            raise ValueError("Run: give the data as MDMTData or EncodedData")
        # training in the configured precision; evaluation in float32, the export in serving_precision
        with (self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()):
            model = build_model(self.model_config, enc.schema, dtype=resolve_precision(c.precision))
            last_stage = _last_stage_epoch(model, c)
            trainer, train_ds, steps_per_epoch, examples_per_step = self._trainer(model, enc)
            trainer.compile()
        validation = ValidationMetrics.of(trainer.serving_model(), enc, c.eval_batch_size)
        trajectory = ArchitectureTrajectory(model)
        balanced = BalanceTrajectory(trainer.balance) if getattr(trainer, "balance", None) is not None else None
        timer = _Timer(examples_per_step)
        stopping = (ResumableEarlyStopping if last_stage is None
                    else functools.partial(_StagedEarlyStopping, last_stage=last_stage))
        stopper = stopping(
            out / "checkpoints", tf.train.Checkpoint(trainer=trainer), patience=c.patience,
            resume_from=self.resume_dir,
            extra_state=lambda: {"arch_trajectory": trajectory.points, "train_seconds": timer.seconds,
                                 "train_examples": timer.examples,
                                 "val_auc_per_epoch": [r["auc"] for r in validation.results],
                                 "balance_trajectory": balanced.points if balanced is not None else []})
        state = stopper.resume()
        start = 0
        if state is not None:
            start = state["epoch"]
            trajectory.points = state.get("arch_trajectory", [])
            if balanced is not None:
                balanced.points = state.get("balance_trajectory", [])
            validation.results = [{"auc": a} for a in state.get("val_auc_per_epoch", [])]
            timer.seconds, timer.examples = state.get("train_seconds", 0.0), state.get("train_examples", 0)
            LOG.info("resuming %s after epoch %d (best val_mean_auc %s at epoch %s)", out, start, state["best"],
                     state["best_epoch"])
        if (state or {}).get("stopped_early"):
            LOG.info("%s: early stopping had ended this run; reporting its best weights", out)
        elif start < c.epochs:
            callbacks = [timer, validation, trajectory, *([balanced] if balanced is not None else []), stopper,
                         keras.callbacks.TensorBoard(log_dir=str(out / "logs"), write_graph=False),
                         *self.extra_callbacks]
            trainer.fit(train_ds, epochs=c.epochs, initial_epoch=start, steps_per_epoch=steps_per_epoch,
                        callbacks=callbacks, verbose=self.verbose, shuffle=False)
        steps = trainer.steps_taken()  # over the whole run: read before the best checkpoint rewinds the counters
        best_epoch = stopper.restore_best()
        # evaluation and export from float32 weights: the same numbers in every graph and batch size
        # (bfloat16 rounding depends on how a matmul is blocked); a bfloat16 export stores its weights in bf16
        evaluated = model.copy_under("float32") if model.dtype_policy.name != "float32" else model
        serving = trainer.serving_model(evaluated)
        exported = serving
        if c.serving_precision != "float32":
            exported = trainer.serving_model(evaluated.copy_under(c.serving_precision))
        trained = Trained(model=evaluated, serving=serving, exported=exported, state=stopper.state,
                          best_epoch=best_epoch, trajectory=trajectory.points, train_seconds=timer.seconds,
                          train_examples=timer.examples, steps=steps,
                          replicas=self.strategy.num_replicas_in_sync if self.strategy is not None else 1,
                          balance=_balance_report(trainer, balanced))
        info = RunInfo(self.model_config, c, out, self.model_dir, source=self.source, export=self.export,
                       plots=self.plots, save_predictions=self.save_predictions)
        return finish(trained, enc, info)


def _check_stages(model_config: ModelConfig, config: TrainConfig) -> None:
    """ConfigError for training settings a model trained in stages (MDMTModel.stages) does not
    follow: MAMDR strategies, architecture search modes, loss balancing. Checked before the run
    directory is written, so a corrected rerun is not taken for another run."""
    stages = model_config.model_class.stages
    if len(stages) == 1:
        return
    if config.strategy != "plain":
        raise ConfigError(f"{model_config.name} trains in stages {list(stages)}: use --strategy plain (MAMDR's "
                          f"{config.strategy!r} steps do not follow its stages)")
    if config.arch_mode in ("bilevel", "authors") or config.balance.method != "none":
        raise ConfigError(f"{model_config.name} trains in stages {list(stages)}: use --arch-mode joint or fixed and "
                          f"no --loss-balance (got {config.arch_mode!r}, balance {config.balance.method!r})")


def _last_stage_epoch(model, config: TrainConfig) -> int | None:
    """For a model trained in stages (MDMTModel.stages), the 0-based epoch its last stage starts
    (None for a model with one stage); ConfigError if the run's epochs never reach it."""
    stages = model.stages
    if len(stages) == 1:
        return None
    last = next((e for e in range(config.epochs) if model.stage_of_epoch(e) == len(stages) - 1), None)
    if last is None:
        raise ConfigError(f"{model.name}: {config.epochs} epoch(s) never reach its last stage {stages[-1]!r}; "
                          "train for more epochs or shorten the earlier stages (stage_epochs)")
    return last


class _StagedEarlyStopping(ResumableEarlyStopping):
    """Early stopping for a model trained in stages: an earlier stage never stops the run and
    its weights are never the run's best (SASS's pre-training leaves the towers untrained), and
    the patience counts the last stage's epochs without improvement."""

    def __init__(self, *args, last_stage: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_stage = last_stage  # the 0-based epoch the last stage starts

    def on_epoch_end(self, epoch, logs=None):
        patience, monitor = self.patience, self.monitor
        if epoch < self.last_stage:  # logged in the history, not monitored
            self.patience, self.monitor = sys.maxsize, "(an earlier stage)"
        elif epoch == self.last_stage:
            self.state["wait"] = 0
        try:
            super().on_epoch_end(epoch, logs)
        finally:
            self.patience, self.monitor = patience, monitor


def _balance_report(trainer, trajectory) -> dict | None:
    """The loss balancing's units, their weights at the best epoch (restored with the model)
    and after every epoch (None without balancing)."""
    balance = getattr(trainer, "balance", None)
    if balance is None:
        return None
    return {"method": type(balance).__name__, "unit": balance.unit, "units": balance.units,
            "weights": balance.weights_now(), "trajectory": trajectory.points if trajectory is not None else []}


def train(model_config: ModelConfig, data: "MDMTData | EncodedData", config: TrainConfig, out_dir,
          **kwargs) -> dict:
    """Train, evaluate, export and report; returns the metrics.json payload."""
    return Run(model_config, data, config, out_dir, **kwargs).run()
