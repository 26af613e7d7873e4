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
