"""The training options' valid values and the MAMDR option check: plain Python, so that
TrainConfig, the CLI's parsers and the pipeline's config read them without importing
TensorFlow; the trainers validate against the same tuples."""
from __future__ import annotations

from mdmt_tf.errors import ConfigError

ARCH_MODES = ("bilevel", "joint", "fixed", "authors")
REDUCTIONS = ("pair", "sample")
STRATEGIES = ("plain", "dn", "dr", "mamdr")
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
SERVING_PRECISIONS = ("float32", "bfloat16")
DISTRIBUTE = ("none", "mirrored", "multiworker")
EMBEDDING_OPTIMIZERS = ("auto", "adam", "row_sparse")
BALANCES = ("none", "uwl", "gradnorm", "metabalance")  # loss balancing (mdmt_tf.training.balance)
BALANCE_UNITS = ("task", "pair")
AUTO_ROWS = 100_000  # "auto": row_sparse from this many embedding table rows (mdmt bench scale)

# MAMDR
SCOPES = ("dense", "all")
INNER_OPTIMIZERS = ("sgd", "adam")
GRANULARITIES = ("pass", "batch")


def check_mamdr_options(*, granularity, inner_lr, outer_lr, dr_lr, k, inner_steps, dr_target_steps) -> None:
    """ConfigError for an invalid MAMDR option (shared by MAMDRTrainer and MAMDRConfig)."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"MAMDR granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    for name, value in (("inner_lr", inner_lr), ("outer_lr", outer_lr), ("dr_lr", dr_lr)):
        if not value > 0:
            raise ConfigError(f"MAMDR {name} must be > 0, got {value}")
    if k < 1 or inner_steps < 1:
        raise ConfigError(f"MAMDR k and inner_steps must be >= 1, got k={k}, inner_steps={inner_steps}")
    if granularity == "pass" and inner_steps != 1:
        raise ConfigError(f"MAMDR inner_steps={inner_steps} applies to granularity 'batch' (with 'pass' each "
                          "domain is trained for one full pass)")
    if dr_target_steps < 0:
        raise ConfigError(f"MAMDR dr_target_steps must be >= 0 (0: no cap), got {dr_target_steps}")
    if granularity == "batch" and dr_target_steps:
        raise ConfigError(f"MAMDR dr_target_steps={dr_target_steps} applies to granularity 'pass' (with 'batch' "
                          "DR takes inner_steps steps on the target domain)")
