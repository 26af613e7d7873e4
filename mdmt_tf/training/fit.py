"""Training orchestration behind `mdmt train`: data -> front -> model -> trainer -> fit ->
best weights -> evaluation -> SavedModel -> metrics.json and plots.

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
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mdmt_tf.data.checks import check_cascade
from mdmt_tf.data.dataset import MDMTData, make_dataset
from mdmt_tf.errors import ConfigError
from mdmt_tf.models import FeatureSchema, ModelConfig, build_model
from mdmt_tf.preprocessing import FeatureFront, encode
from mdmt_tf.training.callbacks import ArchitectureTrajectory, ResumableEarlyStopping, ValidationMetrics
from mdmt_tf.training.evaluation import evaluate
from mdmt_tf.training.losses import REDUCTIONS
from mdmt_tf.training.mamdr import INNER_OPTIMIZERS, SCOPES, MAMDRTrainer
from mdmt_tf.training.trainer import ARCH_MODES, MDMTTrainer

STRATEGIES = ("plain", "dn", "dr", "mamdr")
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
SERVING_PRECISIONS = ("float32", "bfloat16")
DISTRIBUTE = ("none", "mirrored", "multiworker")


def distribution_strategy(kind: str):
    """None, or a tf.distribute strategy: "mirrored" (the devices of this machine) or
    "multiworker" (MultiWorkerMirroredStrategy: one process per worker, cluster from TF_CONFIG)."""
    import os

    if kind == "none":
        return None
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if "TF_CONFIG" not in os.environ:
        raise ConfigError("--strategy-distribute multiworker needs TF_CONFIG, e.g. "
                          '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", '
                          '"index": 0}}')
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX), where the
    mixed_bfloat16 policy is faster; elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str) -> str:
    """'auto' -> 'mixed_bfloat16' on CPUs with native bfloat16, else 'float32'. Measured here:
    M3oE test mean AUC 0.7370 (bf16) vs 0.7377 (float32) on the synthetic data, with ~1.5-2x
    the training throughput (see `mdmt bench train`)."""
    if precision == "auto":
        return "mixed_bfloat16" if native_bfloat16() else "float32"
    return precision


@dataclasses.dataclass(frozen=True)
class MAMDRConfig:
    inner_lr: float = 1e-3      # alpha: DN inner steps and DR steps
    outer_lr: float = 0.5       # beta: DN's Reptile step
    dr_lr: float = 0.5          # gamma: DR's interpolation
    k: int = 2                  # other domains sampled per domain in DR
    inner_steps: int = 1        # steps per domain visit with granularity "batch"
    inner_optimizer: str = "adam"  # "sgd" is the paper's algorithm verbatim
    scope: str = "dense"        # domain-specific copies of "dense" weights or "all"
    granularity: str = "pass"   # "pass": a full pass per domain visit (the official code's); "batch"
    dn_with_specific: bool = False  # DN's steps at theta~ + theta_d instead of theta~ alone
    dr_target_steps: int = 0    # cap on DR's pass over the target domain, in batches (0: none; "pass" only)

    def __post_init__(self):
        from mdmt_tf.training.mamdr import check_options

        check_options(granularity=self.granularity, inner_lr=self.inner_lr, outer_lr=self.outer_lr,
                      dr_lr=self.dr_lr, k=self.k, inner_steps=self.inner_steps, dr_target_steps=self.dr_target_steps)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 2048
    learning_rate: float = 1e-3
    arch_learning_rate: float = 3e-3
    arch_mode: str = "bilevel"
    arch_period: int = 1
    arch_data: str = "holdout:0.1"  # bilevel's architecture batches: "holdout:FRACTION" of training or "val"
    patience: int = 3
    seed: int = 0
    task_weights: tuple[tuple[str, float], ...] = ()
    loss_reduction: str = "pair"
    strategy: str = "plain"
    mamdr: MAMDRConfig = MAMDRConfig()
    precision: str = "auto"     # "auto" (mixed_bfloat16 on CPUs with native bf16), "float32", "mixed_bfloat16"
    jit_compile: bool = False
    serving_precision: str = "float32"  # the exported SavedModel's weights and arithmetic: "float32" or "bfloat16"
    distribute: str = "none"    # "none", "mirrored" or "multiworker" (tf.distribute; TF_CONFIG for multiworker)
    min_count: int = 1
    eval_batch_size: int = 8192

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.learning_rate > 0 and self.arch_learning_rate >= 0, "learning rates must be positive"),
            (self.arch_mode in ARCH_MODES, f"arch mode must be one of {list(ARCH_MODES)}, got {self.arch_mode!r}"),
            (self.arch_period >= 1, f"arch period must be >= 1, got {self.arch_period}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.strategy in STRATEGIES, f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}"),
            (self.loss_reduction in REDUCTIONS, f"loss reduction must be one of {list(REDUCTIONS)}"),
            (self.mamdr.inner_optimizer in INNER_OPTIMIZERS, f"MAMDR inner optimizer must be one of {INNER_OPTIMIZERS}"),
            (self.mamdr.scope in SCOPES, f"MAMDR scope must be one of {list(SCOPES)}"),
            (self.min_count >= 1, f"min count must be >= 1, got {self.min_count}"),
            (self.precision in PRECISIONS, f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}"),
            (self.serving_precision in SERVING_PRECISIONS,
             f"serving precision must be one of {list(SERVING_PRECISIONS)}, got {self.serving_precision!r}"),
            (self.distribute in DISTRIBUTE, f"distribute must be one of {list(DISTRIBUTE)}, got {self.distribute!r}"),
            (self.distribute == "none" or self.strategy == "plain",
             "MAMDR strategies (dn, dr, mamdr) run on one worker; use --strategy plain with a distribution strategy"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.holdout_fraction()

    def holdout_fraction(self) -> float | None:
        if self.arch_data == "val":
            return None
        kind, _, value = self.arch_data.partition(":")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if kind != "holdout" or not 0 < fraction < 1:
            raise ConfigError(f"arch data must be 'val' or 'holdout:FRACTION' with 0 < FRACTION < 1, "
                              f"got {self.arch_data!r}")
        return fraction

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["task_weights"] = dict(self.task_weights)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """From plain values (a YAML / JSON config): unknown keys and values of the wrong type
        are ConfigErrors naming the setting; numbers written as strings (YAML 1.1 reads 1e-3
        without a dot as one) are read as numbers."""
        data = _typed(cls, dict(data), "train")
        data["task_weights"] = tuple(sorted((data.get("task_weights") or {}).items()))
        data["mamdr"] = MAMDRConfig(**_typed(MAMDRConfig, dict(data.get("mamdr") or {}), "train.mamdr"))
        return cls(**data)


def _typed(cls, values: dict, where: str) -> dict:
    """values with its int / float settings of the dataclass `cls` checked and coerced."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        hint = hints[name]
        if hint not in (int, float) or value is None:
            continue
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, float) and hint is int and number.is_integer():
            number = int(number)
        wrong = isinstance(number, bool) or not isinstance(number, (int, float))
        if wrong or (hint is int and isinstance(number, float)):
            raise ConfigError(f"{where}.{name}={value!r} must be {'an integer' if hint is int else 'a number'}")
        values[name] = hint(number)
    return values


@dataclasses.dataclass
class EncodedData:
    """The splits as model inputs (ids / scaled floats), labels and domain indices, with the
    preprocessing front that produced them (exported in front of the model) and a few raw
    serialized examples (TF Serving warmup)."""

    spec: Any
    domains: list
    front: Any
    schema: FeatureSchema
    features: dict
    labels: dict
    domain: dict
    warmup: list

    @classmethod
    def from_data(cls, data: MDMTData) -> "EncodedData":
        """The library path: Keras lookup front built from the training split."""
        from mdmt_tf.data.readers import example_bytes

        front = FeatureFront.from_data(data.spec, data.vocab)
        features = {s: encode(front, data.raw_features(s)) for s in ("train", "val", "test")}
        labels = {s: data.labels(s) for s in ("train", "val", "test")}
        domain = {s: features[s][data.spec.domain] for s in ("train", "val", "test")}
        warmup = example_bytes(data.splits.val.head(32), data.spec, with_labels=False)
        return cls(data.spec, list(data.vocab.domains), front, FeatureSchema.from_data(data.spec, data.vocab),
                   features, labels, domain, warmup)

    def rows(self, split: str) -> int:
        return len(self.domain[split])


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


def _take(arrays: dict, index: np.ndarray) -> dict:
    return {k: v[index] for k, v in arrays.items()}


class _Timer(keras.callbacks.Callback):
    """Wall time and examples of the training steps (validation excluded)."""

    def __init__(self, examples_per_step: int, seconds: float = 0.0, examples: int = 0):
        super().__init__()
        self.examples_per_step, self.seconds, self.examples = examples_per_step, seconds, examples

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += time.perf_counter() - self._start
        self.examples += self._steps * self.examples_per_step


def plain_trainer(model, enc: EncodedData, c: TrainConfig, seed: int, *, learning_rate: float | None = None,
                  arch_learning_rate: float | None = None, arch_mode: str | None = None):
    """(MDMTTrainer, its training batches) for `model` on the encoded data: the construction
    `mdmt train` and the tuner's trials share (the tuner overrides the searched values).

    The architecture steps' batches: bilevel reads a held-out slice of the training rows
    (arch_data "holdout:FRACTION", the default: those rows never enter a weight step) or
    the validation split ("val"); authors reads a second, separately shuffled pass over the
    training rows, as the released code does. The validation split is what picks the best
    epoch and scores tuner trials: a search that also fits alpha / beta on it would choose
    them on the data that then judges them. Models without architecture variables, and
    arch modes that do not search, train the weights on every training row."""
    arch_mode = arch_mode or c.arch_mode
    train_rows = np.arange(enc.rows("train"))
    searching = bool(model.architecture_variables) and arch_mode in ("bilevel", "authors")
    heldout = None
    if searching and arch_mode == "authors":
        heldout = make_dataset(enc.features["train"], enc.labels["train"], batch_size=c.batch_size, shuffle=True,
                               seed=seed + 2)
    elif searching and c.holdout_fraction() is not None:
        order = np.random.default_rng(c.seed).permutation(len(train_rows))
        cut = max(1, int(round(c.holdout_fraction() * len(order))))
        held, train_rows = np.sort(order[:cut]), np.sort(order[cut:])
        heldout = make_dataset(_take(enc.features["train"], held), _take(enc.labels["train"], held),
                               batch_size=c.batch_size, shuffle=True, seed=seed + 1)
    elif searching:
        heldout = make_dataset(enc.features["val"], enc.labels["val"], batch_size=c.batch_size, shuffle=True,
                               seed=seed + 1)
    trainer = MDMTTrainer(model, arch_mode=arch_mode,
                          learning_rate=learning_rate if learning_rate is not None else c.learning_rate,
                          arch_learning_rate=arch_learning_rate if arch_learning_rate is not None
                          else c.arch_learning_rate, arch_period=c.arch_period, heldout=heldout,
                          steps_per_epoch=int(np.ceil(len(train_rows) / c.batch_size)),
                          task_weights=dict(c.task_weights), loss_reduction=c.loss_reduction,
                          jit_compile=c.jit_compile)
    train = make_dataset(_take(enc.features["train"], train_rows), _take(enc.labels["train"], train_rows),
                         batch_size=c.batch_size, shuffle=True, seed=seed)
    return trainer, train


def predictor(model, batch_size: int):
    """numpy features -> {task: probabilities [N]} in batches, in a tf.function."""
    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(features: dict) -> dict:
        n = len(next(iter(features.values())))
        parts: dict[str, list] = {}
        for start in range(0, n, batch_size):
            out = call({k: tf.constant(v[start:start + batch_size]) for k, v in features.items()})
            for task, value in out.items():
                parts.setdefault(task, []).append(np.asarray(value).reshape(-1))
        return {task: np.concatenate(v) for task, v in parts.items()}

    return predict


def _details(model, features: dict, batch_size: int) -> dict:
    """Gate weights ("gates/...", softmax over experts) and PEPNet's Gate NU scalings
    ("gate_nu/...") on the validation split, for the plots."""
    forward = getattr(model, "forward", None)
    if forward is None:
        return {}
    parts: dict[str, list] = {}
    n = len(next(iter(features.values())))
    for start in range(0, n, batch_size):
        _, details = forward({k: tf.constant(v[start:start + batch_size]) for k, v in features.items()})
        for name, value in details.items():
            if name.startswith(("gates/", "gate_nu/")):
                parts.setdefault(name, []).append(np.asarray(value))
    return {k: np.concatenate(v) for k, v in parts.items()}


class Run:
    """One training run in one directory (see the module doc)."""

    def __init__(self, model_config: ModelConfig, data: "MDMTData | EncodedData", config: TrainConfig,
                 out_dir: str | Path, source: str = "", verbose: int | None = None, callbacks=(),
                 export: bool = True, plots: bool = True, save_predictions: bool = False,
                 model_dir: str | Path | None = None):
        self.model_config, self.config = model_config, config
        self.encoded = data if isinstance(data, EncodedData) else None
        self.data = None if self.encoded is not None else data
        self.out = Path(out_dir)
        self.model_dir = Path(model_dir) if model_dir is not None else self.out / "model"
        self.source = source
        self.export, self.plots, self.save_predictions = export, plots, save_predictions
        self.verbose = verbose if verbose is not None else (1 if sys.stdout.isatty() else 2)
        self.extra_callbacks = list(callbacks)

    # ------------------------------------------------------------------ config
    # a rerun may change these (e.g. more epochs to continue a run); anything else must match
    RESUMABLE_CHANGES = ("train.epochs", "train.patience", "train.eval_batch_size", "train.serving_precision")

    def _check_run_config(self) -> None:
        current = json.loads(json.dumps(
            {"model": self.model_config.to_dict(), "train": self.config.to_dict(), "data": self.source}))
        path = self.out / "run_config.json"
        if path.exists():
            previous = json.loads(path.read_text())
            # settings added by a newer version are absent from older runs: read them as their defaults
            defaults = json.loads(json.dumps(TrainConfig().to_dict()))
            previous["train"] = _with_defaults(previous.get("train", {}), defaults)
            differs = [f"{key}: {old!r} -> {new!r}" for key, old, new in _diff(previous, current)
                       if key not in self.RESUMABLE_CHANGES]
            if differs:
                raise ConfigError(f"{self.out} holds a run with another configuration ({'; '.join(differs[:5])}); "
                                  "pass another --out (or delete the directory) to start a new run")
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=1))

    # ------------------------------------------------------------------ pieces
    def _data_seed(self) -> int:
        """The shuffling seed: the configured one for a fresh run; for a run resuming after
        epoch k one derived from (seed, k), so it does not replay the first epochs' orders
        (tf.data's per-iteration reshuffling restarts with a new dataset). A resumed run is
        therefore not bit-identical to an uninterrupted one."""
        state = self.out / "checkpoints" / "state.json"
        epoch = json.loads(state.read_text()).get("epoch", 0) if state.exists() else 0
        return self.config.seed if epoch == 0 else self.config.seed * 1_000_003 + 7919 * epoch

    def _trainer(self, model, enc: EncodedData):
        c = self.config
        weights = dict(c.task_weights)
        seed = self._data_seed()
        if c.strategy != "plain":
            domains = sorted(set(enc.domain["train"].tolist()))
            m = c.mamdr
            trainer = MAMDRTrainer(model, strategy=c.strategy, domains=domains, granularity=m.granularity,
                                   inner_lr=m.inner_lr, outer_lr=m.outer_lr, dr_lr=m.dr_lr, k=m.k,
                                   inner_steps=m.inner_steps, inner_optimizer=m.inner_optimizer,
                                   learning_rate=c.learning_rate, scope=m.scope, dn_with_specific=m.dn_with_specific,
                                   dr_target_steps=m.dr_target_steps, seed=c.seed, task_weights=weights,
                                   loss_reduction=c.loss_reduction)
            # the schedule of epoch e is a function of (seed, e): a resumed run replays the uninterrupted one
            train, steps, rows_per_step = trainer.training_data(enc.features["train"], enc.labels["train"],
                                                                c.batch_size)
            return trainer, train, steps, rows_per_step
        trainer, train = plain_trainer(model, enc, c, seed)
        return trainer, train, None, c.batch_size

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        self.strategy = distribution_strategy(self.config.distribute)  # before any other TF op
        self.chief = self.strategy is None or is_chief(self.strategy)
        if not self.chief:  # every worker checkpoints (collectively), each into its own directory
            index = self.strategy.cluster_resolver.task_id
            self.out = self.out / "workers" / f"{self.strategy.cluster_resolver.task_type}-{index}"
            self.export = self.plots = False
        # a cascade (ESMM) needs nested training labels: checked before the run directory is written
        train_labels = self.data.labels("train") if self.data is not None else self.encoded.labels["train"]
        check_cascade(self.model_config, (self.data or self.encoded).spec.tasks, train_labels, self.data)
        self._check_run_config()
        previous_policy = keras.mixed_precision.global_policy()
        try:
            keras.mixed_precision.set_global_policy(resolve_precision(self.config.precision))
            keras.utils.set_random_seed(self.config.seed)
            return self._run()
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)

    def _run(self) -> dict:
        c, out = self.config, self.out
        enc = self.encoded if self.encoded is not None else EncodedData.from_data(self.data)
        # training runs under the configured precision; evaluation in float32, the export in serving_precision
        with (self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()):
            model = build_model(self.model_config, enc.schema)
            trainer, train_ds, steps_per_epoch, examples_per_step = self._trainer(model, enc)
            trainer.compile()
        serving = trainer.serving_model() if isinstance(trainer, MAMDRTrainer) else model
        validation = ValidationMetrics(predictor(serving, c.eval_batch_size), enc.features["val"],
                                       enc.labels["val"], enc.domain["val"], enc.domains, enc.spec.tasks)
        trajectory = ArchitectureTrajectory(lambda: model)
        timer = _Timer(examples_per_step)
        stopper = ResumableEarlyStopping(
            out / "checkpoints", tf.train.Checkpoint(trainer=trainer), patience=c.patience,
            extra_state=lambda: {"arch_trajectory": trajectory.points, "train_seconds": timer.seconds,
                                 "train_examples": timer.examples,
                                 "val_auc_per_epoch": [r["auc"] for r in validation.results]})
        state = stopper.resume()
        start = 0
        if state is not None:
            start = state["epoch"]
            trajectory.points = state.get("arch_trajectory", [])
            validation.results = [{"auc": a} for a in state.get("val_auc_per_epoch", [])]
            timer.seconds, timer.examples = state.get("train_seconds", 0.0), state.get("train_examples", 0)
            print(f"[mdmt] resuming {out} after epoch {start} (best val_mean_auc {state['best']} at epoch "
                  f"{state['best_epoch']})", flush=True)
        if (state or {}).get("stopped_early"):
            print(f"[mdmt] {out}: early stopping had ended this run; reporting its best weights", flush=True)
        elif start < c.epochs:
            callbacks = [timer, validation, trajectory, stopper,
                         keras.callbacks.TensorBoard(log_dir=str(out / "logs"), write_graph=False),
                         *self.extra_callbacks]
            trainer.fit(train_ds, epochs=c.epochs, initial_epoch=start, steps_per_epoch=steps_per_epoch,
                        callbacks=callbacks, verbose=self.verbose, shuffle=False)
        # steps taken over the whole run (read before the best checkpoint rewinds the counters)
        self.steps_taken = {}
        if isinstance(trainer, MDMTTrainer):
            self.steps_taken["weight"] = int(keras.ops.convert_to_numpy(trainer.weight_steps))
            if trainer.searching:
                self.steps_taken["architecture"] = int(keras.ops.convert_to_numpy(trainer.arch_steps))
        best_epoch = stopper.restore_best()
        if keras.mixed_precision.global_policy().name != "float32":
            keras.mixed_precision.set_global_policy("float32")  # evaluation and export from here on
            model, serving = self._copy_under("float32", model, trainer)
        exported = serving
        if c.serving_precision != "float32":
            _, exported = self._copy_under(c.serving_precision, model, trainer)
        return self._finish(model, serving, exported, enc, stopper.state, best_epoch, trajectory.points, timer)

    @staticmethod
    def _copy_under(policy: str, model, trainer):
        """(model, serving model) with the trained weights, built under the dtype `policy`.

        float32: evaluation and the export then give the same numbers in every graph and
        batch size (bfloat16 rounding depends on how a matmul is blocked). bfloat16: the
        serving export with `serving_precision: bfloat16`, whose weights are stored in
        bfloat16, so no per-call casts (half the size, faster where bfloat16 is native)."""
        copy = model.copy_under(policy)
        if isinstance(trainer, MAMDRTrainer):  # theta + theta_d with DR (theta_d cast to the copy's dtypes)
            return copy, trainer.serving_model(copy)
        return copy, copy

    def _finish(self, model, serving, exported, enc: EncodedData, state, best_epoch, trajectory, timer) -> dict:
        from mdmt_tf.export.savedmodel import export_savedmodel
        from mdmt_tf.report import plots
        from mdmt_tf.report.metrics import arch_summary, write_metrics

        c, out = self.config, self.out
        predict = predictor(serving, c.eval_batch_size)
        domains, tasks = enc.domains, list(enc.spec.tasks)
        predictions = {s: predict(enc.features[s]) for s in ("val", "test")}
        results = {s: evaluate(predictions[s], enc.labels[s], enc.domain[s], domains, tasks) for s in predictions}
        if self.save_predictions:
            np.savez_compressed(out / "test_predictions.npz", **predictions["test"])
        served = {"precision": c.serving_precision}
        if exported is not serving:  # what the export scores, against the float32 evaluation above
            test = predictor(exported, c.eval_batch_size)(enc.features["test"])
            check = evaluate(test, enc.labels["test"], enc.domain["test"], domains, tasks)
            served.update(test_mean_auc=check["mean_auc"], test_mean_logloss=check["mean_logloss"],
                          test_max_abs_diff=max(float(np.max(np.abs(test[t] - predictions["test"][t])))
                                                for t in tasks))
        if self.export:
            export_savedmodel(exported, enc.front, enc.spec, self.model_dir, warmup_examples=enc.warmup,
                              metadata={"model": self.model_config.to_dict(), "domains": domains,
                                        "serving_precision": c.serving_precision})
        payload = {
            "model": self.model_config.name,
            "val": results["val"], "test": results["test"],
            "arch": arch_summary(model.architecture_values(), domains, tasks),
            "train_seconds": timer.seconds,
            "train_examples_per_second": timer.examples / timer.seconds if timer.seconds else None,
            "epochs_trained": state["epoch"], "best_epoch": best_epoch, "stopped_early": state.get("stopped_early"),
            "steps": self.steps_taken, "serving": served,
            "replicas": self.strategy.num_replicas_in_sync if self.strategy is not None else 1,
            "history": state["history"], "config": self.config.to_dict(),
            "model_config": {"name": self.model_config.name, "params": self.model_config.resolved_params()},
            "data": {"source": self.source, "rows": {s: enc.rows(s) for s in ("train", "val", "test")},
                     "domains": domains, "tasks": tasks},
        }
        payload = write_metrics(out / "metrics.json", payload)
        if not self.plots:
            return payload
        (out / "plots").mkdir(exist_ok=True)
        plots.auc_heatmap(payload["test"], domains, tasks, out / "plots" / "auc_heatmap.png")
        if state["history"]:
            plots.training_curves(state["history"], out / "plots" / "training_curves.png")
        plots.arch_trajectories(trajectory, out / "plots" / "arch_trajectories.png")
        details = _details(model, enc.features["val"], c.eval_batch_size)
        gates = {k: v for k, v in details.items() if k.startswith("gates/")}
        plots.gate_utilisation(gates, enc.domain["val"], domains, tasks, out / "plots" / "gate_utilisation.png")
        scalings = {k: v for k, v in details.items() if k.startswith("gate_nu/")}
        if scalings:
            plots.gate_nu(scalings, enc.domain["val"], domains, tasks, out / "plots" / "gate_nu.png")
        return payload


def train(model_config: ModelConfig, data: "MDMTData | EncodedData", config: TrainConfig, out_dir,
          **kwargs) -> dict:
    """Train, evaluate, export and report; returns the metrics.json payload."""
    return Run(model_config, data, config, out_dir, **kwargs).run()
