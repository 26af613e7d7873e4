import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.data.dataset import make_dataset
from mdmt_tf.preprocessing import FeatureFront, encode


@pytest.fixture(scope="module")
def data(small_data):
    return small_data


def test_ids_oov_and_scaling(data):
    spec, vocab = data.spec, data.vocab
    front = FeatureFront.from_data(spec, vocab)
    raw = {k: v[:4].copy() for k, v in data.raw_features("train").items()}
    raw["user_id"][1] = "never-seen-user"
    raw["item_id"][2] = ""
    out = encode(front, raw)
    assert out["user_id"][0] == vocab.sparse["user_id"].index(raw["user_id"][0]) + 1
    assert out["user_id"][1] == 0 and out["item_id"][2] == 0  # OOV bucket
    assert list(out["domain_id"]) == [vocab.domains.index(d) for d in raw["domain_id"]]
    expected = (raw["age"] - vocab.dense_mean["age"]) / vocab.dense_std["age"]
    np.testing.assert_allclose(out["age"], expected, rtol=1e-5)
    assert {v.dtype for k, v in out.items() if k != "age"} == {np.dtype("int32")}


def test_ids_of_values_only_in_test_are_oov(data):
    """Vocabularies come from the training split only."""
    train_users = set(data.splits.train["user_id"])
    test_only = [u for u in data.splits.test["user_id"] if u not in train_users]
    assert test_only, "the fixture should have users unseen in training"
    front = FeatureFront.from_data(data.spec, data.vocab)
    encoded = encode(front, data.raw_features("test"))
    is_new = ~data.splits.test["user_id"].isin(train_users).to_numpy()
    assert (encoded["user_id"][is_new] == 0).all() and (encoded["user_id"][~is_new] > 0).all()


def test_unknown_domain_fails_with_its_name(data):
    front = FeatureFront.from_data(data.spec, data.vocab)
    raw = {k: v[:2].copy() for k, v in data.raw_features("train").items()}
    raw["domain_id"][1] = "mars"
    with pytest.raises(tf.errors.InvalidArgumentError, match="unknown value of domain column 'domain_id'"):
        encode(front, raw)


def test_serialization_round_trip_and_tf_data(data):
    front = FeatureFront.from_data(data.spec, data.vocab)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(front))
    raw = data.raw_features("val")
    a, b = encode(front, raw), encode(clone, raw)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ds = make_dataset(a, data.labels("val"), batch_size=128, shuffle=True, seed=0)
    features, labels = next(iter(ds))
    assert features["user_id"].shape == (128,) and set(labels) == {"click", "like"}


def test_oov_buckets_and_hashing_in_the_front():
    import tensorflow as tf

    from mdmt_tf.data.vocab import Vocabularies
    from mdmt_tf.preprocessing import FeatureFront
    from mdmt_tf.spec import DatasetSpec

    spec = DatasetSpec(domain="d", tasks=["y"], sparse=["s", "h"], vocab={"s": {"oov_buckets": 4},
                                                                            "h": {"hash_bins": 50}})
    vocab = Vocabularies(sparse={"s": ["p", "q"], "h": []}, domains=["a"], dense_mean={}, dense_std={},
                         oov_buckets={"s": 4}, hash_bins={"h": 50})
    front = FeatureFront.from_data(spec, vocab)
    values = ["p", "q", "unseen", "other", "", "p"]
    out = front({"d": tf.constant(["a"] * 6), "s": tf.constant(values), "h": tf.constant(values)})
    s, h = out["s"].numpy(), out["h"].numpy()
    assert list(s[[0, 1, 5]]) == [4, 5, 4]  # known values after the 4 OOV buckets
    expected_oov = tf.strings.to_hash_bucket_fast(tf.constant(values[2:5]), 4).numpy()
    assert list(s[2:5]) == list(expected_oov) and all(0 <= v < 4 for v in s[2:5])
    assert h[4] == 0 and all(1 <= v < 50 for v in h[[0, 1, 2, 3, 5]]) and h[0] == h[5]
    assert list(h[:4]) == list(1 + tf.strings.to_hash_bucket_fast(tf.constant(values[:4]), 49).numpy())
    again = FeatureFront.from_config(front.get_config())
    np.testing.assert_array_equal(again({"d": tf.constant(["a"]), "s": tf.constant(["other"]),
                                         "h": tf.constant(["other"])})["s"].numpy(), s[[3]])
