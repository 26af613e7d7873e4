"""Vocabularies and dense statistics, built on the training split only.

Sparse ids: each feature's values seen in training at least `min_count` times (the spec's
per-field `vocab.min_count`, else the run's), most frequent first (ties by value); with
`vocab.top_k`, the k most frequent of them (ties at the cut: the larger value, as
tensorflow-transform chooses). By default id 0 is the out-of-vocabulary (OOV) bucket: a
value unseen in training, rarer than `min_count`, or empty maps to 0, in training,
evaluation and serving alike, and known values map to 1..len(vocabulary); with
`vocab.oov_buckets` k the OOV values hash into 0..k-1 and known values follow at k.
A field with `vocab.hash_bins` has no vocabulary (mdmt_tf.data.idmap).

Domains: the spec's `domains` list if given, else the training values sorted (numbers
numerically). A domain value unseen in training is an error, not an OOV: a model has no
tower for it.

Dense: mean and standard deviation on training, for standardisation.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt_tf.data.table import ROW
from mdmt_tf.errors import DataError
from mdmt_tf.spec import DatasetSpec

OOV_ID = 0


def natural_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


@dataclasses.dataclass
class Vocabularies:
    sparse: dict[str, list[str]]
    domains: list[str]
    dense_mean: dict[str, float]
    dense_std: dict[str, float]
    oov_buckets: dict[str, int] = dataclasses.field(default_factory=dict)  # fields with k != 1
    hash_bins: dict[str, int] = dataclasses.field(default_factory=dict)    # hashed fields (no vocabulary)

    @classmethod
    def build(cls, train: pd.DataFrame, spec: DatasetSpec, min_count: int = 1,
              source: str = "train") -> "Vocabularies":
        counts = {name: train[name][train[name] != ""].value_counts() for name in spec.sparse
                  if not spec.field_vocab(name).hashed}
        seen = sorted(set(train[spec.domain]), key=natural_key)
        if spec.domains is not None:
            unknown = [d for d in seen if d not in spec.domains]
            if unknown:
                first = train[train[spec.domain] == unknown[0]][ROW].iloc[0]
                raise DataError(f"domain value {unknown[0]!r} is not among the spec's domains "
                                f"{list(spec.domains)}", source=source, row=int(first), column=spec.domain)
        mean = {n: float(np.mean(train[n].to_numpy(np.float64))) for n in spec.dense}
        std = {n: float(np.std(train[n].to_numpy(np.float64))) for n in spec.dense}
        return cls.from_counts(spec, counts, seen, mean, std, min_count)

    @classmethod
    def from_counts(cls, spec: DatasetSpec, counts: dict[str, pd.Series], domains_seen: list[str],
                    dense_mean: dict[str, float], dense_std: dict[str, float], min_count: int = 1) -> "Vocabularies":
        """The vocabularies from per-field value counts of the training split (a Series value ->
        count, empty values excluded; hashed fields need none), the training domain values and
        the dense statistics: what `build` computes in memory and a streaming pass in pieces."""
        if min_count < 1:
            raise DataError(f"min_count must be >= 1, got {min_count}")
        sparse, oov_buckets, hash_bins = {}, {}, {}
        for name in spec.sparse:
            rule = spec.field_vocab(name)
            if rule.hash_bins is not None:
                sparse[name], hash_bins[name] = [], rule.hash_bins
                continue
            if rule.oov_buckets != 1:
                oov_buckets[name] = rule.oov_buckets
            field = counts[name]
            field = field[field >= (rule.min_count or min_count)]
            frame = pd.DataFrame({"value": field.index.astype(str), "count": field.to_numpy()})
            if rule.top_k is not None:  # the k most frequent, ties at the cut as tensorflow-transform: larger value
                frame = frame.sort_values(["count", "value"], ascending=[False, False], kind="mergesort")
                frame = frame.head(rule.top_k)
            # most frequent first, ties by value: deterministic
            frame = frame.sort_values(["count", "value"], ascending=[False, True], kind="mergesort")
            sparse[name] = frame["value"].tolist()
        domains = list(spec.domains) if spec.domains is not None else sorted(domains_seen, key=natural_key)
        return cls(sparse=sparse, domains=domains, dense_mean=dict(dense_mean), dense_std=dict(dense_std),
                   oov_buckets=oov_buckets, hash_bins=hash_bins)

    def size(self, feature: str) -> int:
        """Number of ids of a sparse feature, OOV buckets included (its embedding table's rows)."""
        if feature in self.hash_bins:
            return self.hash_bins[feature]
        return len(self.sparse[feature]) + self.oov_buckets.get(feature, 1)

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Vocabularies":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls(**json.loads(text))
