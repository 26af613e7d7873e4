"""FeatureSchema: what a model needs to know about its inputs (from a spec + vocabularies)."""
from __future__ import annotations

import dataclasses

import numpy as np

from mdmt_tf.data.vocab import Vocabularies
from mdmt_tf.errors import ConfigError
from mdmt_tf.spec import DatasetSpec


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
    """Model inputs: the domain index, sparse ids (with vocabulary sizes, OOV included)
    and dense floats, all of shape [batch]; and the task names, in order.

    domains: the domain values, index i of the model's domain input is domains[i].
    """

    domain: str
    domains: tuple[str, ...]
    tasks: tuple[str, ...]
    sparse: tuple[tuple[str, int], ...]
    dense: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "domains", tuple(str(d) for d in self.domains))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "sparse", tuple((str(n), int(s)) for n, s in self.sparse))
        object.__setattr__(self, "dense", tuple(self.dense))
        if not self.domains:
            raise ConfigError("a feature schema needs at least one domain")
        if not self.tasks:
            raise ConfigError("a feature schema needs at least one task")
        if not self.sparse and not self.dense:
            raise ConfigError("a feature schema needs sparse and/or dense features")

    @classmethod
    def from_data(cls, spec: DatasetSpec, vocab: Vocabularies) -> "FeatureSchema":
        return cls(domain=spec.domain, domains=tuple(vocab.domains), tasks=spec.tasks,
                   sparse=tuple((name, vocab.size(name)) for name in spec.sparse), dense=spec.dense)

    @classmethod
    def coerce(cls, value) -> "FeatureSchema":
        if isinstance(value, cls):
            return value
        return cls(**{**value, "sparse": tuple(tuple(p) for p in value["sparse"])})

    def to_dict(self) -> dict:
        return {"domain": self.domain, "domains": list(self.domains), "tasks": list(self.tasks),
                "sparse": [[n, s] for n, s in self.sparse], "dense": list(self.dense)}

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def sparse_sizes(self) -> dict[str, int]:
        return dict(self.sparse)

    @property
    def sparse_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.sparse)

    def field_sizes(self, with_domain: bool = True) -> dict[str, int]:
        """Embedded fields: the domain index (a field of num_domains ids) then the sparse ones."""
        sizes = {self.domain: self.num_domains} if with_domain else {}
        sizes.update(self.sparse)
        return sizes

    def input_dtypes(self) -> dict[str, str]:
        dtypes = {self.domain: "int32"}
        dtypes.update({n: "int32" for n in self.sparse_names})
        dtypes.update({n: "float32" for n in self.dense})
        return dtypes

    def dummy_batch(self, size: int = 2) -> dict[str, np.ndarray]:
        return {name: np.zeros((size,), dtype=dtype) for name, dtype in self.input_dtypes().items()}
