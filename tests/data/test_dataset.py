"""make_dataset: complete epochs, a new order each epoch, reproducible by seed."""
import numpy as np
import tensorflow as tf

from mdmt_tf.data.dataset import make_dataset

N = 1000


def _rows(ds):
    return [b[0]["id"].numpy() for b in ds]


def test_epochs_are_complete_shuffled_and_reproducible():
    features, labels = {"id": np.arange(N)}, {"y": np.zeros(N, "float32")}
    ds = make_dataset(features, labels, batch_size=64, shuffle=True, seed=3)
    first, second = _rows(ds), _rows(ds)
    assert [len(b) for b in first] == [64] * 15 + [40]
    assert int(ds.cardinality()) == 16
    assert sorted(np.concatenate(first).tolist()) == list(range(N))
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))  # reshuffled per epoch
    again = make_dataset(features, labels, batch_size=64, shuffle=True, seed=3)
    np.testing.assert_array_equal(np.concatenate(_rows(again)), np.concatenate(first))
    other = make_dataset(features, labels, batch_size=64, shuffle=True, seed=4)
    assert not np.array_equal(np.concatenate(_rows(other)), np.concatenate(first))


def test_order_drop_remainder_and_repeat():
    features = {"id": np.arange(N)}
    plain = make_dataset(features, batch_size=300)
    np.testing.assert_array_equal(np.concatenate([b["id"].numpy() for b in plain]), np.arange(N))
    dropped = make_dataset(features, batch_size=300, drop_remainder=True)
    assert [len(b["id"]) for b in dropped] == [300, 300, 300]
    endless = make_dataset(features, batch_size=300, shuffle=True, seed=0, repeat=True, drop_remainder=True)
    assert int(endless.cardinality()) == int(tf.data.INFINITE_CARDINALITY)
    batches = [b["id"].numpy() for b in endless.take(7)]
    assert all(len(b) == 300 for b in batches)
