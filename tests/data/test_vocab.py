import pandas as pd

from mdmt_tf.data.table import ROW
from mdmt_tf.data.vocab import Vocabularies
from mdmt_tf.spec import DatasetSpec

SPEC = DatasetSpec(domain="d", tasks=["y"], sparse=["s"], dense=["x"])


def _table(d, s, x):
    t = pd.DataFrame({"d": d, "s": s, "x": x, "y": [0] * len(d)})
    t[ROW] = range(2, len(d) + 2)
    return t


def test_frequency_order_min_count_and_empty_values():
    train = _table(["a"] * 6, ["q", "p", "p", "r", "", "q"], [1.0, 2, 3, 4, 5, 6])
    vocab = Vocabularies.build(train, SPEC)
    assert vocab.sparse["s"] == ["p", "q", "r"]  # by count, ties by value; "" never a token
    assert vocab.size("s") == 4  # + OOV bucket
    assert Vocabularies.build(train, SPEC, min_count=2).sparse["s"] == ["p", "q"]
    assert vocab.dense_mean["x"] == 3.5


def test_domains_sorted_naturally_or_as_declared():
    train = _table(["10", "9", "2", "9"], ["a"] * 4, [0.0] * 4)
    assert Vocabularies.build(train, SPEC).domains == ["2", "9", "10"]
    declared = DatasetSpec(domain="d", tasks=["y"], sparse=["s"], domains=["10", "9", "2", "77"])
    assert Vocabularies.build(train, declared).domains == ["10", "9", "2", "77"]


def test_json_round_trip(tmp_path):
    vocab = Vocabularies.build(_table(["a", "b"], ["x", "y"], [1.0, 2.0]), SPEC)
    vocab.to_json(tmp_path / "v.json")
    assert Vocabularies.from_json(tmp_path / "v.json") == vocab
    assert Vocabularies.from_json(vocab.to_json()) == vocab


def _spec(**vocab):
    return DatasetSpec(domain="d", tasks=["y"], sparse=["s", "h"], dense=["x"], vocab=vocab)


def _rows(s):
    t = _table(["a"] * len(s), s, [0.0] * len(s))
    t["h"] = s
    return t


def test_per_field_min_count_and_top_k_with_ties_at_the_cut():
    # p:3, q:2, r:2, t:1, u:1
    train = _rows(["p", "q", "p", "r", "q", "p", "r", "t", "u"])
    assert Vocabularies.build(train, _spec(s={"min_count": 2})).sparse["s"] == ["p", "q", "r"]
    # top 2: p, then the tie q / r is cut: tensorflow-transform keeps the larger value, r
    assert Vocabularies.build(train, _spec(s={"top_k": 2})).sparse["s"] == ["p", "r"]
    assert Vocabularies.build(train, _spec(s={"top_k": 4})).sparse["s"] == ["p", "q", "r", "u"]
    # the run's min_count applies where the field gives none
    built = Vocabularies.build(train, _spec(s={"top_k": 10}), min_count=2)
    assert built.sparse["s"] == ["p", "q", "r"] and built.sparse["h"] == ["p", "q", "r"]


def test_oov_buckets_and_hash_bins_set_the_table_sizes():
    train = _rows(["p", "q", "p"])
    vocab = Vocabularies.build(train, _spec(s={"oov_buckets": 5}, h={"hash_bins": 1000}))
    assert vocab.size("s") == 2 + 5 and vocab.size("h") == 1000 and vocab.sparse["h"] == []
    assert Vocabularies.from_json(vocab.to_json()) == vocab


def test_spec_vocab_errors_name_the_key_and_the_fix():
    import pytest

    from mdmt_tf.errors import SpecError

    base = {"domain": "d", "tasks": ["y"], "sparse": ["s"]}
    for vocab, message in [({"x": {}}, "not sparse columns"), ({"s": {"top_k": 0}}, "vocab.s.top_k"),
                           ({"s": {"hash_bins": 9, "top_k": 2}}, "drop min_count, top_k"),
                           ({"s": {"bins": 9}}, "unknown key"), ({"s": {"hash_bins": 1}}, "hash_bins' must be >= 2")]:
        with pytest.raises(SpecError, match=message):
            DatasetSpec.from_dict({**base, "vocab": vocab})
    spec = DatasetSpec.from_dict({**base, "vocab": {"s": {"oov_buckets": 3}}})
    assert DatasetSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["vocab"] == {"s": {"oov_buckets": 3}}
