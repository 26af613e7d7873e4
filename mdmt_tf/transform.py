"""The tensorflow-transform preprocessing of the TFX pipeline, built from a DatasetSpec.

It produces exactly the model inputs of the library path (mdmt_tf.preprocessing):

  sparse feature  -> int64 id: 1..V for the V values of the training vocabulary (values
                     seen at least `min_count` times), 0 for anything else (the OOV bucket);
                     or the spec's per-field rule (`vocab`: min_count, top_k, oov_buckets,
                     hash_bins), through the same functions as the library (mdmt_tf.data.idmap)
  domain          -> index into the domain list: the spec's `domains` if declared, else the
                     training vocabulary (most frequent first); -1 for an unknown value,
                     which the serving front rejects with an error naming the column
  dense feature   -> z-score with training mean / standard deviation (float32)
  task label      -> float32, passed through

Vocabulary files are named after the features (`tft_output.vocabulary_by_name(name)`);
the domain vocabulary is named "domain". Only tensorflow-transform is imported, never TFX.
"""
from __future__ import annotations

import tensorflow as tf

from mdmt_tf.data.idmap import from_transform_ids, hashed_ids
from mdmt_tf.spec import DatasetSpec, FieldVocab

DOMAIN_VOCABULARY = "domain"


def _dense_column(x, default):
    """A [batch] tensor from what Transform feeds (dense [B] / [B, 1] or sparse)."""
    if isinstance(x, tf.SparseTensor):
        x = tf.sparse.to_dense(tf.sparse.reset_shape(x, [tf.shape(x, out_type=tf.int64)[0], 1]), default)
    return tf.reshape(x, [-1])


def _as_text(x):
    x = _dense_column(x, "" if x.dtype == tf.string else 0)
    return x if x.dtype == tf.string else tf.strings.as_string(x)


def domain_index(values, spec: DatasetSpec):
    """Domain values (strings) -> int64 index, -1 when unknown."""
    import tensorflow_transform as tft

    if spec.domains is not None:
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(list(spec.domains)),
                                                tf.range(len(spec.domains), dtype=tf.int64)), default_value=-1)
        return table.lookup(values)
    return tft.compute_and_apply_vocabulary(values, num_oov_buckets=0, default_value=-1,
                                            vocab_filename=DOMAIN_VOCABULARY)


def sparse_ids(values, name: str, min_count: int = 1, rule: FieldVocab | None = None):
    """Strings -> ids as the library maps them: by default 0 = OOV and 1..V for the training
    vocabulary; `rule` (the spec's vocab entry) may set the field's min_count, top_k,
    oov_buckets, or hash_bins (no vocabulary)."""
    import tensorflow_transform as tft

    rule = rule or FieldVocab()
    if rule.hash_bins is not None:
        return hashed_ids(values, rule.hash_bins)
    ids = tft.compute_and_apply_vocabulary(values, num_oov_buckets=rule.oov_buckets, vocab_filename=name,
                                           frequency_threshold=rule.min_count or min_count, top_k=rule.top_k)
    return from_transform_ids(ids, tft.experimental.get_vocabulary_size_by_name(name), rule.oov_buckets)


def preprocessing_fn(inputs: dict, spec: DatasetSpec, min_count: int = 1) -> dict:
    """The Transform preprocessing for `spec` (see the module doc)."""
    import tensorflow_transform as tft

    outputs = {spec.domain: domain_index(_as_text(inputs[spec.domain]), spec)}
    for name in spec.sparse:
        outputs[name] = sparse_ids(_as_text(inputs[name]), name, min_count, spec.field_vocab(name))
    for name in spec.dense:
        outputs[name] = tft.scale_to_z_score(tf.cast(_dense_column(inputs[name], 0), tf.float32))
    for task in spec.tasks:
        if task in inputs:
            outputs[task] = tf.cast(_dense_column(inputs[task], 0), tf.float32)
    return outputs
