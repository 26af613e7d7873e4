import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.layers import FieldEmbedding

RTOL = 1e-5
VOCAB = {"a": 3, "b": 4, "c": 2}  # offsets a:0, b:3, c:7; 9 rows
DIM = 2


def arange_init(shape, dtype=None):
    """Row r of the table is [2r, 2r+1] (dim 2): every row is distinguishable."""
    return np.arange(np.prod(shape), dtype="float32").reshape(shape)


def row(r):
    return [2.0 * r, 2.0 * r + 1.0]


def np_(x):
    return keras.ops.convert_to_numpy(x)


def test_offsets_and_table():
    layer = FieldEmbedding(VOCAB, DIM, embeddings_initializer=arange_init)
    layer.build()
    assert layer.fields == ("a", "b", "c")
    assert layer.offsets == {"a": 0, "b": 3, "c": 7}
    assert layer.total == 9
    assert tuple(layer.embeddings.shape) == (9, DIM)


def test_lookup_reads_offset_rows():
    layer = FieldEmbedding(VOCAB, DIM, embeddings_initializer=arange_init)
    # ids given in a different dict order: the output follows vocab_sizes' order
    ids = {"c": np.array([1, 0]), "a": np.array([0, 2]), "b": np.array([3, 1])}
    out = np_(layer(ids))
    assert out.shape == (2, 3, DIM)
    # sample 0: a id 0 -> row 0; b id 3 -> row 3+3 = 6; c id 1 -> row 7+1 = 8
    # sample 1: a id 2 -> row 2; b id 1 -> row 3+1 = 4; c id 0 -> row 7
    expected = [[row(0), row(6), row(8)], [row(2), row(4), row(7)]]
    np.testing.assert_allclose(out, expected, rtol=RTOL)


def test_gradient_reaches_only_looked_up_rows():
    layer = FieldEmbedding(VOCAB, DIM, embeddings_initializer=arange_init)
    ids = {"a": np.array([1]), "b": np.array([0]), "c": np.array([1])}  # rows 1, 3, 8
    layer(ids)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids))
    grad = tf.convert_to_tensor(tape.gradient(loss, layer.embeddings)).numpy()
    expected = np.zeros((9, DIM), "float32")
    expected[[1, 3, 8]] = 1.0
    np.testing.assert_array_equal(grad, expected)


def test_l2_loss():
    layer = FieldEmbedding(VOCAB, DIM, l2=0.1, embeddings_initializer=arange_init)
    ids = {"a": np.array([1, 2]), "b": np.array([0, 0]), "c": np.array([1, 0])}
    layer(ids)
    # looked-up rows 1, 3, 8 and 2, 3, 7; sum of squares: r=1: 4+9 = 13, r=2: 16+25 = 41, r=3: 36+49 = 85,
    # r=7: 196+225 = 421, r=8: 256+289 = 545 -> 13+85+545 + 41+85+421 = 1190; 0.1 * 1190 / batch 2 = 59.5
    assert len(layer.losses) == 1
    np.testing.assert_allclose(np_(layer.losses[0]), 59.5, rtol=RTOL)


def test_no_loss_without_l2():
    layer = FieldEmbedding(VOCAB, DIM)
    layer({"a": np.array([1]), "b": np.array([1]), "c": np.array([1])})
    assert layer.losses == []


def _ids_read(out, offsets):
    """Invert arange_init: the id each [B, F, 2] output row came from."""
    rows = np.rint(out[..., 0] / 2).astype(int)
    return rows - np.array(offsets)[None, :]


@pytest.mark.parametrize("rate, low, high", [(0.999999, 0.995, 1.0), (0.5, 0.46, 0.54)])
def test_oov_replacement_training_only_and_only_oov_fields(rate, low, high):
    layer = FieldEmbedding({"a": 5, "b": 5}, DIM, oov_rate=rate, oov_fields=("a",), seed=7,
                           embeddings_initializer=arange_init)
    n = 2000
    ids = {"a": np.full(n, 3), "b": np.full(n, 4)}
    read = _ids_read(np_(layer(ids, training=True)), [0, 5])
    assert set(np.unique(read[:, 0]).tolist()) <= {0, 3}
    zero_fraction = float(np.mean(read[:, 0] == 0))
    assert low <= zero_fraction <= high, zero_fraction
    np.testing.assert_array_equal(read[:, 1], 4)  # b is not an oov field
    for training in (False, None):  # inference: untouched
        read = _ids_read(np_(layer(ids, training=training)), [0, 5])
        np.testing.assert_array_equal(read, np.tile([3, 4], (n, 1)))


def test_no_oov_replacement_when_rate_is_zero():
    layer = FieldEmbedding({"a": 5}, DIM, oov_fields=("a",), embeddings_initializer=arange_init)
    read = _ids_read(np_(layer({"a": np.full(500, 3)}, training=True)), [0])
    np.testing.assert_array_equal(read, 3)


def test_roundtrip(roundtrip):
    layer = FieldEmbedding(VOCAB, DIM, l2=0.01, oov_rate=0.2, oov_fields=["a"], seed=3, name="emb")
    ids = {"a": np.array([0, 2]), "b": np.array([3, 1]), "c": np.array([1, 0])}
    clone = roundtrip(layer, ids)
    assert clone.fields == layer.fields
    assert clone.offsets == layer.offsets


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(vocab_sizes={}, dim=2), ["`vocab_sizes`", "{}"]),
    (dict(vocab_sizes={"a": 3, "b": 0}, dim=2), ["vocab_sizes['b']", "=0"]),
    (dict(vocab_sizes={"a": True}, dim=2), ["vocab_sizes['a']", "=True"]),
    (dict(vocab_sizes={"a": 3}, dim=0), ["`dim`", "dim=0"]),
    (dict(vocab_sizes={"a": 3}, dim=2.5), ["`dim`", "dim=2.5"]),
    (dict(vocab_sizes={"a": 3}, dim=2, oov_rate=1.0), ["`oov_rate`", "oov_rate=1.0"]),
    (dict(vocab_sizes={"a": 3}, dim=2, oov_rate=-0.1), ["`oov_rate`", "oov_rate=-0.1"]),
    (dict(vocab_sizes={"a": 3}, dim=2, oov_fields=("a", "zzz")), ["`oov_fields`", "zzz"]),
])
def test_validation(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        FieldEmbedding(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
