"""The id rules of sparse fields (mdmt_tf.spec.FieldVocab) as TensorFlow ops, shared by the
library's preprocessing front (mdmt_tf.preprocessing) and the pipeline's Transform
(mdmt_tf.transform), so that both, and the models they export, map a value to the same id.

Vocabulary fields: ids 0..k-1 are the k OOV buckets (a value outside the vocabulary goes to
bucket fingerprint64(value) mod k, k = oov_buckets), the V vocabulary values follow at
k..k+V-1. Keras' StringLookup(num_oov_indices=k) computes exactly this; tensorflow-transform's
vocabulary lookup (known values 0..V-1, OOV V + fingerprint64(value) mod k) is remapped to it
by `from_transform_ids`. Hashed fields: the empty value is id 0, any other value
1 + fingerprint64(value) mod (hash_bins - 1).
"""
from __future__ import annotations

import tensorflow as tf


def hashed_ids(values, hash_bins: int):
    """Strings -> int64 ids in [0, hash_bins): 0 for "", else 1 + fingerprint64 mod (hash_bins - 1)."""
    hashed = tf.strings.to_hash_bucket_fast(values, hash_bins - 1) + 1
    return tf.where(tf.equal(values, ""), tf.zeros_like(hashed), hashed)


def from_transform_ids(ids, vocabulary_size, oov_buckets: int):
    """tensorflow-transform's ids (known 0..V-1, OOV buckets V..V+k-1) -> ours (OOV 0..k-1,
    known k..k+V-1)."""
    ids = tf.cast(ids, tf.int64)
    size = tf.cast(vocabulary_size, tf.int64)
    return tf.where(ids >= size, ids - size, ids + oov_buckets)
