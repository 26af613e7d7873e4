"""Training configuration: TrainConfig (and its MAMDRConfig and BalanceConfig), the one source of the training
defaults that `mdmt train / compare / tune`, the tuner and the pipeline read."""
from __future__ import annotations

import dataclasses
import typing

from mdmt_tf.errors import ConfigError
from mdmt_tf.training.options import (
    ARCH_MODES,
    BALANCE_UNITS,
    BALANCES,
    DISTRIBUTE,
    EMBEDDING_OPTIMIZERS,
    INNER_OPTIMIZERS,
    PRECISIONS,
    REDUCTIONS,
    SCOPES,
    SERVING_PRECISIONS,
    STRATEGIES,
    check_mamdr_options,
)


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
        check_mamdr_options(granularity=self.granularity, inner_lr=self.inner_lr, outer_lr=self.outer_lr,
                            dr_lr=self.dr_lr, k=self.k, inner_steps=self.inner_steps,
                            dr_target_steps=self.dr_target_steps)


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    """Loss balancing (mdmt_tf.training.balance): the method, its units and its settings."""

    method: str = "none"        # "none", "uwl", "gradnorm", "metabalance"
    unit: str = "task"          # balance the tasks' losses, or the (domain, task) pairs' ("pair")
    target_task: str = ""       # metabalance: the task the others assist (default: the first)
    alpha: float = 1.5          # gradnorm: the restoring force's strength (the paper's default)
    relax: float = 0.7          # metabalance: r, how far auxiliary gradients move to the target's magnitude
    beta: float = 0.9           # metabalance: the moving averages' decay

    def __post_init__(self):
        checks = [
            (self.method in BALANCES, f"loss balance must be one of {list(BALANCES)}, got {self.method!r}"),
            (self.unit in BALANCE_UNITS, f"balance unit must be one of {list(BALANCE_UNITS)}, got {self.unit!r}"),
            (self.alpha >= 0, f"GradNorm alpha must be >= 0, got {self.alpha}"),
            (0 <= self.relax <= 1, f"MetaBalance relax factor must be in [0, 1], got {self.relax}"),
            (0 <= self.beta < 1, f"MetaBalance beta must be in [0, 1), got {self.beta}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 2048
    learning_rate: float = 1e-3
    arch_learning_rate: float = 3e-3
    arch_mode: str = "joint"    # M3oE: joint (no search; measured best), bilevel, fixed, authors
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
    # the weight optimizer's update of embedding tables: "row_sparse" (RowSparseAdam: only the
    # batch's rows), "adam" (Keras' Adam: every row), "auto" (row_sparse from 100k table rows)
    embedding_optimizer: str = "auto"
    # the streaming input's shuffle buffer, in records; 0: no shuffling (in memory too: rows in file order)
    shuffle_buffer: int = 100_000
    balance: BalanceConfig = BalanceConfig()

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
            (self.mamdr.inner_optimizer in INNER_OPTIMIZERS,
             f"MAMDR inner optimizer must be one of {INNER_OPTIMIZERS}"),
            (self.mamdr.scope in SCOPES, f"MAMDR scope must be one of {list(SCOPES)}"),
            (self.min_count >= 1, f"min count must be >= 1, got {self.min_count}"),
            (self.strategy == "plain" or self.embedding_optimizer != "row_sparse",
             f"--embedding-optimizer row_sparse applies to --strategy plain (MAMDR's {self.strategy!r} steps use "
             "Keras' Adam; 'auto' picks it)"),
            (self.embedding_optimizer in EMBEDDING_OPTIMIZERS,
             f"embedding optimizer must be one of {list(EMBEDDING_OPTIMIZERS)}, got {self.embedding_optimizer!r}"),
            (self.shuffle_buffer >= 0, f"shuffle buffer must be >= 0, got {self.shuffle_buffer}"),
            (self.eval_batch_size >= 1, f"eval batch size must be >= 1, got {self.eval_batch_size}"),
            (self.precision in PRECISIONS, f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}"),
            (self.serving_precision in SERVING_PRECISIONS,
             f"serving precision must be one of {list(SERVING_PRECISIONS)}, got {self.serving_precision!r}"),
            (self.distribute in DISTRIBUTE, f"distribute must be one of {list(DISTRIBUTE)}, got {self.distribute!r}"),
            (self.distribute == "none" or self.strategy == "plain",
             "MAMDR strategies (dn, dr, mamdr) run on one worker; use --strategy plain with a distribution strategy"),
            (self.balance.method == "none" or self.strategy == "plain",
             f"--loss-balance applies to --strategy plain (MAMDR's {self.strategy!r} steps sum the losses)"),
            (self.balance.method in ("none", "uwl") or self.distribute == "none",
             f"--loss-balance {self.balance.method} balances one replica's per-unit gradients: it runs without "
             "--strategy-distribute (uwl runs with one)"),
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
        data["balance"] = BalanceConfig(**_typed(BalanceConfig, dict(data.get("balance") or {}), "train.balance"))
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
