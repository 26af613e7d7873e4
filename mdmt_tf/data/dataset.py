"""MDMTData: a spec, its typed splits and the training-split vocabularies; and tf.data.

    spec, splits = load_source("synthetic")
    data = MDMTData.build(spec, splits)          # vocabularies from train only
    raw = data.raw_features("train")             # {column: np.ndarray} strings / floats
    ds = make_dataset(encoded, data.labels("train"), batch_size=2048, shuffle=True, seed=0)

Raw features are what a client sends (domain and sparse values as strings, dense as
float32); the preprocessing front (mdmt_tf.preprocessing) turns them into ids and scaled
floats for the model.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mdmt_tf.data.readers import SPLITS, Splits
from mdmt_tf.data.table import check_domains
from mdmt_tf.data.vocab import Vocabularies, natural_key
from mdmt_tf.spec import DatasetSpec


@dataclasses.dataclass
class MDMTData:
    spec: DatasetSpec
    splits: Splits
    vocab: Vocabularies

    @classmethod
    def build(cls, spec: DatasetSpec, splits: Splits, min_count: int = 1) -> "MDMTData":
        vocab = Vocabularies.build(splits.train, spec, min_count=min_count, source=splits.sources["train"])
        trained = sorted(set(splits.train[spec.domain]), key=natural_key)
        for split in ("val", "test"):
            check_domains(splits[split], spec, trained, splits.sources[split])
        return cls(spec=spec, splits=splits, vocab=vocab)

    def raw_features(self, split: str) -> dict[str, np.ndarray]:
        return raw_feature_arrays(self.splits[split], self.spec)

    def labels(self, split: str) -> dict[str, np.ndarray]:
        return label_arrays(self.splits[split], self.spec)

    def domain_index(self, split: str) -> np.ndarray:
        """Each row's domain as an index into vocab.domains."""
        lookup = {d: i for i, d in enumerate(self.vocab.domains)}
        return self.splits[split][self.spec.domain].map(lookup).to_numpy(np.int32)

    def sizes(self) -> dict[str, int]:
        return {split: len(self.splits[split]) for split in SPLITS}


def raw_feature_arrays(table, spec: DatasetSpec) -> dict[str, np.ndarray]:
    out = {spec.domain: table[spec.domain].to_numpy(dtype=object).astype(str)}
    for name in spec.sparse:
        out[name] = table[name].to_numpy(dtype=object).astype(str)
    for name in spec.dense:
        out[name] = table[name].to_numpy(dtype=np.float32)
    return out


def label_arrays(table, spec: DatasetSpec) -> dict[str, np.ndarray]:
    return {task: table[task].to_numpy(dtype=np.float32) for task in spec.tasks}


def make_dataset(features: dict[str, np.ndarray], labels: dict[str, np.ndarray] | None = None, *,
                 batch_size: int = 2048, shuffle: bool = False, seed: int | None = None,
                 repeat: bool = False, drop_remainder: bool = False):
    """In-memory arrays -> batched, prefetched tf.data, in a new random order every epoch
    (every iteration of the dataset) if `shuffle`, reproducibly for a given `seed`.

    Each epoch draws one permutation of the rows (a stateless shuffle keyed by
    Dataset.random, which re-randomises per iteration), slices it into batches and gathers
    each batch from the arrays in one vectorised op. That costs ~0.5 ms per 2048-row batch
    here, against ~12 ms for shuffling and batching dict elements one by one.
    """
    import tensorflow as tf

    n = len(next(iter(features.values())))
    elements = (features, labels) if labels is not None else features
    tensors = tf.nest.map_structure(tf.constant, elements)
    stop = n - batch_size + 1 if drop_remainder else n
    if stop <= 0:
        stop = 1 if not drop_remainder else 0

    def batches_of(order):
        return tf.data.Dataset.range(0, stop, batch_size).map(lambda start: order[start:start + batch_size])

    if shuffle:
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        keys = keys if repeat else keys.take(1)
        orders = keys.map(lambda key: tf.argsort(tf.random.stateless_uniform([n], seed=tf.stack([key, 0]))))
    else:
        orders = tf.data.Dataset.from_tensors(tf.range(n, dtype=tf.int32))
        orders = orders.repeat() if repeat else orders
    count = len(range(0, stop, batch_size))
    rows = orders.flat_map(batches_of).apply(tf.data.experimental.assert_cardinality(
        tf.data.INFINITE_CARDINALITY if repeat else count))
    gathered = rows.map(lambda index: tf.nest.map_structure(lambda column: tf.gather(column, index), tensors))
    return gathered.prefetch(tf.data.AUTOTUNE)
