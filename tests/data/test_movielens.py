import numpy as np
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


def _raw_ratings(src):
    return pd.read_csv(src / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"],
                       dtype={"user_id": str, "item_id": str})


def _raw_users(src):
    return pd.read_csv(src / "u.user", sep="|", header=None, names=["user_id", "age", "gender", "occupation", "zip"],
                       dtype=str)


def test_converter_rows_match_the_raw_files_row_by_row(ml100k_dir, tmp_path):
    """Every converted row joined back to u.data / u.user by (user, item): labels from the
    rating, domain from the user's age, user features and the scaled age."""
    splits = convert_ml100k(ml100k_dir, tmp_path, seed=0)
    converted = pd.concat([splits.train, splits.val, splits.test], ignore_index=True)
    ratings = _raw_ratings(ml100k_dir)
    assert not ratings.duplicated(["user_id", "item_id"]).any()  # (user, item) is a key of u.data
    joined = converted.merge(ratings, on=["user_id", "item_id"], how="inner", validate="one_to_one",
                             suffixes=("", "_raw"))
    assert len(joined) == 100_000
    assert (joined["click"] == (joined["rating"] > 3).astype(int)).all()
    assert (joined["like"] == (joined["rating"] > 4).astype(int)).all()
    assert (joined["timestamp"] == joined["timestamp_raw"]).all()
    assert joined["click"].sum() == (ratings["rating"] > 3).sum() == 55_375
    assert joined["like"].sum() == (ratings["rating"] > 4).sum() == 21_201

    users = _raw_users(ml100k_dir)
    users["age"] = users["age"].astype(int)
    joined = joined.merge(users, on="user_id", how="left", suffixes=("", "_user"), validate="many_to_one")
    age = joined["age_user"]
    expected = pd.cut(age, [0, 24, 34, 200], labels=list(AGE_GROUPS)).astype(str)
    assert (joined["domain_id"] == expected).all()
    for column in ("gender", "occupation", "zip"):
        assert (joined[column] == joined[f"{column}_user"]).all(), column
    scaled = (age - users["age"].min()) / (users["age"].max() - users["age"].min())
    assert np.allclose(joined["age"], scaled, atol=1e-6)


def test_cate_id_is_the_first_genre_of_the_item(ml100k_dir, tmp_path):
    splits = convert_ml100k(ml100k_dir, tmp_path, seed=0)
    converted = pd.concat([splits.train, splits.val, splits.test], ignore_index=True)
    cate = converted.groupby("item_id")["cate_id"].agg(set)
    assert (cate.map(len) == 1).all()  # one category per item
    cate = cate.map(lambda s: next(iter(s)))
    # known items: Toy Story is Animation|Children's|Comedy, GoldenEye Action|Adventure|Thriller,
    # Four Rooms Thriller
    assert (cate["1"], cate["2"], cate["3"]) == ("Animation", "Action", "Thriller")
    # and every item, from u.item's genre flags in u.genre's order
    genres = [line.split("|")[0] for line in (ml100k_dir / "u.genre").read_text().splitlines() if line]
    expected = {}
    for line in (ml100k_dir / "u.item").read_text(encoding="latin-1").splitlines():
        fields = line.split("|")
        flags = fields[5:5 + len(genres)]
        expected[fields[0]] = genres[flags.index("1")]
    assert cate.to_dict() == {item: expected[item] for item in cate.index}


def test_converter_seed_changes_the_split(ml100k_dir, tmp_path):
    a = convert_ml100k(ml100k_dir, tmp_path / "a", seed=0)
    b = convert_ml100k(ml100k_dir, tmp_path / "b", seed=1)
    assert not a.test["_row"].equals(b.test["_row"])


def test_not_a_movielens_directory(tmp_path):
    with pytest.raises(DataError, match="missing"):
        convert_ml100k(tmp_path, tmp_path / "out")
