import pandas as pd
import pytest

from mdmt_tf.data.movielens import AGE_GROUPS, ML100K_SPEC, convert_ml100k
from mdmt_tf.data.readers import read_csv
from mdmt_tf.errors import DataError

pytestmark = pytest.mark.ml100k


def _expected_domain_sizes(src):
    """Per-age-group row counts computed straight from the raw files."""
    ages = {}
    for line in (src / "u.user").read_text().splitlines():
        uid, age, *_ = line.split("|")
        ages[uid] = int(age)
    sizes = dict.fromkeys(AGE_GROUPS, 0)
    for line in (src / "u.data").read_text().splitlines():
        age = ages[line.split("\t")[0]]
        sizes["<25" if age < 25 else "25-34" if age < 35 else ">=35"] += 1
    return sizes


def test_converter_rows_domains_labels(ml100k_dir, tmp_path):
    splits = convert_ml100k(ml100k_dir, tmp_path, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80_000, 10_000, 10_000)
    everything = pd.concat([splits.train, splits.val, splits.test])
    assert len(everything) == 100_000
    assert everything["domain_id"].value_counts().to_dict() == _expected_domain_sizes(ml100k_dir)
    assert (everything["like"] <= everything["click"]).all()
    assert 0.0 <= everything["age"].min() and everything["age"].max() <= 1.0
    # written files read back identically through the CSV reader and spec.yaml
    again = read_csv(tmp_path, ML100K_SPEC)
    assert len(again.test) == 10_000
    assert list(again.test["item_id"]) == list(splits.test["item_id"])
    assert (tmp_path / "spec.yaml").read_text().startswith("domain: domain_id")


def test_converter_seed_changes_the_split(ml100k_dir, tmp_path):
    a = convert_ml100k(ml100k_dir, tmp_path / "a", seed=0)
    b = convert_ml100k(ml100k_dir, tmp_path / "b", seed=1)
    assert not a.test["_row"].equals(b.test["_row"])


def test_not_a_movielens_directory(tmp_path):
    with pytest.raises(DataError, match="missing"):
        convert_ml100k(tmp_path, tmp_path / "out")
