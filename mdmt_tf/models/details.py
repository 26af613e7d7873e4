"""Typed records of what a model reports besides its predictions.

ArchValue (mdmt_tf.layers.records): an architecture variable (M3oE's alpha, beta, gate
logits) as the model applies it, from the layer that owns it. Details: what one forward pass computed per example --
the logits, softmax gates over experts, Gate NU scalings of units -- each named by the
layer or model that produced it. Reports and plots read these fields; nothing parses
variable paths or key prefixes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from mdmt_tf.layers.records import ArchValue


@dataclasses.dataclass(frozen=True)
class Gate:
    """Softmax weights over experts, per example: weights [B, G, E] for G gates (one per task,
    or per task of the example's own domain) over E experts; rows sum to 1."""

    name: str
    weights: Any


@dataclasses.dataclass(frozen=True)
class Scaling:
    """A Gate NU's per-example scaling of units, in (0, gate_scale): [B, n] or [B, T, n]."""

    name: str
    values: Any


@dataclasses.dataclass(frozen=True)
class Details:
    """What a forward pass computed per example. extra: model-specific tensors by name (e.g.
    ESMM's conditional probabilities); architecture: filled by MDMTModel.explain."""

    logits: Any
    gates: tuple[Gate, ...] = ()
    scalings: tuple[Scaling, ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    architecture: tuple[ArchValue, ...] = ()

    def arrays(self) -> dict[tuple[str, str], Any]:
        """The per-example tensors keyed by (field, name): what `from_arrays` rebuilds (to
        run a model in batches and put the pieces back together)."""
        out: dict[tuple[str, str], Any] = {("logits", ""): self.logits}
        out.update({("gates", g.name): g.weights for g in self.gates})
        out.update({("scalings", s.name): s.values for s in self.scalings})
        out.update({("extra", name): value for name, value in self.extra.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[tuple[str, str], Any],
                    architecture: tuple[ArchValue, ...] = ()) -> "Details":
        return cls(logits=arrays[("logits", "")],
                   gates=tuple(Gate(name, v) for (field, name), v in arrays.items() if field == "gates"),
                   scalings=tuple(Scaling(name, v) for (field, name), v in arrays.items() if field == "scalings"),
                   extra={name: v for (field, name), v in arrays.items() if field == "extra"},
                   architecture=tuple(architecture))

    def numpy(self) -> "Details":
        """The same record with every tensor converted to a NumPy array."""
        return Details.from_arrays({k: np.asarray(v) for k, v in self.arrays().items()}, self.architecture)

    def gate(self, name: str) -> Gate:
        return _named(self.gates, name, "gate")

    def scaling(self, name: str) -> Scaling:
        return _named(self.scalings, name, "scaling")


def _named(records, name: str, what: str):
    for record in records:
        if record.name == name:
            return record
    raise KeyError(f"no {what} named {name!r}; this model reports {[r.name for r in records]}")
