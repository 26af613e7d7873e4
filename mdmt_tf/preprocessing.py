"""The preprocessing front: raw features -> the model's ids and scaled floats.

`FeatureFront` is a Keras layer built from a DatasetSpec and the training-split
Vocabularies. It maps

  domain value (string)  -> index into vocab.domains (int32); an unknown value fails
                            with InvalidArgument "unknown value of domain column ..."
  sparse value (string)  -> id (int32): 1..len(vocab) for known values, 0 = OOV bucket
                            (or the spec's per-field rule: several OOV buckets, or
                            hashing; mdmt_tf.data.idmap)
  dense value (number)   -> (x - mean) / std (float32), training-split statistics

Training applies it once to the in-memory arrays (`encode`); the exported SavedModel
applies it inside the serving graph, so training and serving share one implementation.
In the TFX pipeline the Transform graph takes this role.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mdmt_tf.data.idmap import hashed_ids
from mdmt_tf.data.vocab import Vocabularies
from mdmt_tf.spec import DatasetSpec

_MIN_STD = 1e-6


@keras.saving.register_keras_serializable(package="mdmt_tf")
class FeatureFront(keras.layers.Layer):
    def __init__(self, spec: dict, vocab: dict, **kwargs):
        super().__init__(**kwargs)
        self.spec_config = dict(spec)
        self.vocab_config = dict(vocab)
        self.spec = DatasetSpec.from_dict(spec)
        self.vocab = Vocabularies(**vocab)
        self.domain_lookup = keras.layers.StringLookup(
            vocabulary=list(self.vocab.domains), num_oov_indices=1, output_mode="int",
            name=f"lookup_{self.spec.domain}")
        self.lookups = {
            name: keras.layers.StringLookup(
                vocabulary=list(self.vocab.sparse[name]) or ["<no training values>"],
                num_oov_indices=self.vocab.oov_buckets.get(name, 1), output_mode="int", name=f"lookup_{name}")
            for name in self.spec.sparse if name not in self.vocab.hash_bins}
        self.mean = {n: float(self.vocab.dense_mean[n]) for n in self.spec.dense}
        self.std = {n: max(float(self.vocab.dense_std[n]), _MIN_STD) for n in self.spec.dense}

    @classmethod
    def from_data(cls, spec: DatasetSpec, vocab: Vocabularies, **kwargs) -> "FeatureFront":
        import dataclasses

        return cls(spec=spec.to_dict(), vocab=dataclasses.asdict(vocab), **kwargs)

    @property
    def raw_types(self) -> dict:
        """The raw input of each feature: domain and sparse values as strings, dense as float32."""
        types = {self.spec.domain: tf.string}
        types.update({n: tf.string for n in self.spec.sparse})
        types.update({n: tf.float32 for n in self.spec.dense})
        return types

    def build(self, input_shape=None):
        pass  # lookups carry their vocabularies; nothing to create

    def call(self, inputs):
        spec = self.spec
        out = {}
        domain = tf.cast(self.domain_lookup(_as_string(inputs[spec.domain])), tf.int32) - 1
        check = tf.debugging.assert_non_negative(
            domain, message=f"unknown value of domain column '{spec.domain}'; known values: "
                            f"{list(self.vocab.domains)}")
        with tf.control_dependencies([check]):
            out[spec.domain] = tf.identity(domain)
        for name in spec.sparse:
            if name in self.vocab.hash_bins:
                out[name] = tf.cast(hashed_ids(_as_string(inputs[name]), self.vocab.hash_bins[name]), tf.int32)
            else:
                out[name] = tf.cast(self.lookups[name](_as_string(inputs[name])), tf.int32)
        for name in spec.dense:
            value = tf.cast(inputs[name], tf.float32)
            out[name] = (value - self.mean[name]) / self.std[name]
        return out

    def get_config(self):
        return {**super().get_config(), "spec": self.spec_config, "vocab": self.vocab_config}


def _as_string(x):
    return x if x.dtype == tf.string else tf.strings.as_string(x)


def encode(front: FeatureFront, raw: dict[str, np.ndarray], chunk: int = 262_144) -> dict[str, np.ndarray]:
    """Apply the front to in-memory raw arrays, in chunks; returns numpy arrays."""
    n = len(next(iter(raw.values())))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, chunk):
        batch = {k: tf.constant(v[start:start + chunk]) for k, v in raw.items()}
        for k, v in front(batch).items():
            parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}
