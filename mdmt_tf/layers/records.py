"""ArchValue: an architecture variable as a layer applies it (a typed record, so reports
never parse variable paths)."""
from __future__ import annotations

import dataclasses

import numpy as np

ARCH_KINDS = ("alpha", "beta", "gate_logits")


@dataclasses.dataclass(frozen=True)
class ArchValue:
    """kind: "alpha" (amplitude, across views), "beta" (balance, within a view) or
    "gate_logits"; group: what the value is per -- "domain" or "task" for alpha / beta, the
    gates' layer for gate logits; value: sigmoid(raw) for alpha / beta (the weight the fusion
    applies), the raw logits [gates, experts] for gate logits; one entry per domain / task
    with arch_granularity="vector", one scalar otherwise."""

    kind: str
    group: str
    value: np.ndarray

    def __post_init__(self):
        if self.kind not in ARCH_KINDS:
            raise ValueError(f"ArchValue: `kind` must be one of {ARCH_KINDS}, received {self.kind!r}")

    @property
    def key(self) -> str:
        """"alpha/domain", "beta/task", "gate_logits/<layer>": a stable name for logs and plots."""
        return f"{self.kind}/{self.group}"
