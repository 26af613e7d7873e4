"""The spec's per-field vocabulary rules mean the same in the library's front and in the
pipeline's Transform: the same values are in the vocabulary, an out-of-vocabulary value
lands in the same OOV bucket, a hashed field gets the same id. (Among values of equal
count the two may number the vocabulary differently; each path serves its own numbering
with the model trained on it.)"""
import tempfile

import numpy as np
import pandas as pd
import tensorflow as tf

from mdmt_tf.data.table import ROW
from mdmt_tf.data.vocab import Vocabularies
from mdmt_tf.preprocessing import FeatureFront
from mdmt_tf.spec import DatasetSpec

SPEC = DatasetSpec(domain="d", tasks=["y"], sparse=["top", "rare", "hashed", "plain"], domains=["a", "b"],
                   vocab={"top": {"top_k": 9, "oov_buckets": 3}, "rare": {"min_count": 3},
                          "hashed": {"hash_bins": 17}})


def _train():
    rng = np.random.default_rng(0)
    columns = {name: [f"v{int(i)}" for i in rng.zipf(1.6, 400) % 40] for name in SPEC.sparse}
    table = pd.DataFrame({"d": rng.choice(["a", "b"], 400), **columns, "y": rng.integers(0, 2, 400).astype(float)})
    table[ROW] = range(2, 402)
    return table


def _transform(train: pd.DataFrame, values: list[str]) -> dict:
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    from mdmt_tf.transform import preprocessing_fn

    feature_spec = {name: tf.io.FixedLenFeature([], tf.string) for name in ("d", *SPEC.sparse)}
    feature_spec["y"] = tf.io.FixedLenFeature([], tf.float32)
    meta = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(feature_spec))
    rows = train[["d", *SPEC.sparse, "y"]].to_dict("records")
    probe = [{"d": "a", **{name: v for name in SPEC.sparse}, "y": 0.0} for v in values]
    with tft_beam.Context(temp_dir=tempfile.mkdtemp()):
        analyzed = (rows, meta) | tft_beam.AnalyzeDataset(lambda inputs: preprocessing_fn(inputs, SPEC))
        transformed, _ = ((probe, meta), analyzed) | tft_beam.TransformDataset()
    return {name: np.array([int(r[name]) for r in transformed]) for name in SPEC.sparse}


def test_library_and_transform_map_values_alike():
    train = _train()
    values = sorted({v for name in SPEC.sparse for v in train[name]}) + ["never", "seen", "", "v999"]
    vocab = Vocabularies.build(train, SPEC)
    front = FeatureFront.from_data(SPEC, vocab)
    ours = {name: ids.numpy() for name, ids in front({"d": tf.constant(["a"] * len(values)),
                                                      **{n: tf.constant(values) for n in SPEC.sparse}}).items()}
    theirs = _transform(train, values)

    np.testing.assert_array_equal(ours["hashed"], theirs["hashed"])
    assert ours["hashed"].max() < 17
    for name in ("top", "rare", "plain"):
        buckets = SPEC.field_vocab(name).oov_buckets
        oov_ours, oov_theirs = ours[name] < buckets, theirs[name] < buckets
        np.testing.assert_array_equal(oov_ours, oov_theirs, err_msg=name)  # the same vocabulary
        np.testing.assert_array_equal(ours[name][oov_ours], theirs[name][oov_theirs], err_msg=name)  # same bucket
        known = {v: (a, b) for v, a, b in zip(values, ours[name], theirs[name]) if a >= buckets}
        assert len({a for a, _ in known.values()}) == len({b for _, b in known.values()}) == len(known)  # 1:1
        assert len(known) == len(vocab.sparse[name]) and max(ours[name]) < vocab.size(name)
        assert max(theirs[name]) < vocab.size(name)
    assert len(vocab.sparse["top"]) == 9 and vocab.size("top") == 12
    assert set(vocab.sparse["rare"]) == {v for v, c in train["rare"].value_counts().items() if c >= 3}
    assert len(set(ours["top"][ours["top"] < 3])) > 1  # the OOV values spread over the 3 buckets
    counts = train["top"].value_counts().sort_values(ascending=False).to_numpy()
    assert counts[8] == counts[9]  # the data puts a tie at the top_k cut: both paths keep the same one
