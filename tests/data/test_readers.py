import gzip

import numpy as np
import pandas as pd
import pytest

from mdmt_tf.data.dataset import MDMTData
from mdmt_tf.data.readers import read_csv, read_csv_file, read_tfrecord, write_csv, write_tfrecord
from mdmt_tf.data.table import ROW
from mdmt_tf.errors import DataError

SPEC_COLS = ["domain_id", "user_id", "item_id", "gender", "occupation", "zip", "cate_id", "age", "click", "like"]


def _same_rows(a: pd.DataFrame, b: pd.DataFrame):
    pd.testing.assert_frame_equal(a[SPEC_COLS].reset_index(drop=True), b[SPEC_COLS].reset_index(drop=True),
                                  check_dtype=False)


def test_csv_directory_split_is_honoured_exactly(csv_dir, small_synthetic):
    spec, _ = small_synthetic
    splits = read_csv(csv_dir, spec)
    for split in ("train", "val", "test"):
        on_disk = pd.read_csv(csv_dir / f"{split}.csv", dtype=str)
        assert len(splits[split]) == len(on_disk)
        assert list(splits[split]["user_id"]) == list(on_disk["user_id"])
        # row numbers are file line numbers (header = line 1)
        assert splits[split][ROW].iloc[0] == 2
    assert splits.train["age"].dtype == np.float32
    assert set(splits.train["click"].unique()) <= {0, 1}


def test_single_csv_is_split_80_10_10_by_seed(tmp_path, small_synthetic):
    spec, table = small_synthetic
    write_csv(table, tmp_path / "all.csv")
    a = read_csv(tmp_path / "all.csv", spec, seed=3)
    b = read_csv(tmp_path / "all.csv", spec, seed=3)
    c = read_csv(tmp_path / "all.csv", spec, seed=4)
    assert [len(a.train), len(a.val), len(a.test)] == [2400, 300, 300]
    _same_rows(a.test, b.test)
    assert not a.test[ROW].equals(c.test[ROW])
    rows = np.concatenate([a.train[ROW], a.val[ROW], a.test[ROW]])
    assert sorted(rows) == list(range(2, 3002))  # disjoint, complete, original line numbers


def test_gzipped_csv_directory(tmp_path, csv_dir, small_synthetic):
    spec, _ = small_synthetic
    for split in ("train", "val", "test"):
        with open(csv_dir / f"{split}.csv", "rb") as src, gzip.open(tmp_path / f"{split}.csv.gz", "wb") as dst:
            dst.write(src.read())
    _same_rows(read_csv(tmp_path, spec).val, read_csv(csv_dir, spec).val)


def test_tfrecord_directory_matches_csv(tmp_path, csv_dir, small_synthetic):
    spec, _ = small_synthetic
    from_csv = read_csv(csv_dir, spec)
    for split, table in from_csv.items():
        write_tfrecord(table, tmp_path / f"{split}.tfrecord.gz", spec)
    from_tfr = read_tfrecord(tmp_path, spec)
    for split in ("train", "val", "test"):
        _same_rows(from_tfr[split], from_csv[split])
        assert from_tfr[split][ROW].iloc[0] == 1  # record numbers


def test_single_tfrecord_is_split_like_csv(tmp_path, small_synthetic):
    spec, table = small_synthetic
    write_tfrecord(table, tmp_path / "all.tfrecord", spec)
    splits = read_tfrecord(tmp_path / "all.tfrecord", spec, seed=1)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [2400, 300, 300]


# ------------------------------------------------------------------ bad input
def _write(path, text):
    path.write_text(text)
    return path


HEADER = "domain_id,user_id,item_id,gender,occupation,zip,cate_id,age,click,like\n"
GOOD = "0,u1,i1,F,occ1,z001,c01,30,1,0\n"


def test_missing_column_names_file_header_and_column(tmp_path, small_synthetic):
    spec, _ = small_synthetic
    f = _write(tmp_path / "x.csv", HEADER.replace(",age", "") + "0,u1,i1,F,occ1,z001,c01,1,0\n")
    with pytest.raises(DataError) as err:
        read_csv_file(f, spec)
    msg = str(err.value)
    assert str(f) in msg and "row 1" in msg and "'age'" in msg and "missing" in msg
    assert err.value.column == "age" and err.value.row == 1


def test_label_outside_0_1_names_row_and_column(tmp_path, small_synthetic):
    spec, _ = small_synthetic
    f = _write(tmp_path / "x.csv", HEADER + GOOD + GOOD + "1,u2,i2,M,occ2,z002,c02,40,1,2\n")
    with pytest.raises(DataError) as err:
        read_csv_file(f, spec)
    assert (err.value.source, err.value.row, err.value.column) == (str(f), 4, "like")
    assert "'2' is not 0 or 1" in str(err.value)


def test_non_numeric_dense_names_row_and_column(tmp_path, small_synthetic):
    spec, _ = small_synthetic
    f = _write(tmp_path / "x.csv", HEADER + GOOD + "1,u2,i2,M,occ2,z002,c02,forty,1,0\n" + GOOD)
    with pytest.raises(DataError) as err:
        read_csv_file(f, spec)
    assert (err.value.row, err.value.column) == (3, "age")
    assert "'forty' is not a finite number" in str(err.value)
    f = _write(tmp_path / "y.csv", HEADER + "1,u2,i2,M,occ2,z002,c02,,1,0\n")
    with pytest.raises(DataError, match="row 2, column 'age': dense value is empty"):
        read_csv_file(f, spec)


def test_empty_split_is_an_error_naming_the_file(tmp_path, csv_dir, small_synthetic):
    spec, _ = small_synthetic
    _write(csv_dir / "val.csv", HEADER)
    with pytest.raises(DataError) as err:
        read_csv(csv_dir, spec)
    assert str(csv_dir / "val.csv") in str(err.value) and "no data rows" in str(err.value)
    _write(csv_dir / "val.csv", "")
    with pytest.raises(DataError, match="is empty"):
        read_csv(csv_dir, spec)


def test_domain_never_seen_in_training_is_an_error(tmp_path, csv_dir, small_synthetic):
    spec, _ = small_synthetic
    test = pd.read_csv(csv_dir / "test.csv", dtype=str)
    test.loc[4, "domain_id"] = "7"
    test.to_csv(csv_dir / "test.csv", index=False)
    spec_without_list = type(spec)(domain=spec.domain, tasks=spec.tasks, sparse=spec.sparse, dense=spec.dense)
    splits = read_csv(csv_dir, spec_without_list)
    with pytest.raises(DataError) as err:
        MDMTData.build(spec_without_list, splits)
    assert (err.value.source, err.value.row, err.value.column) == (str(csv_dir / "test.csv"), 6, "domain_id")
    assert "'7' never appears in the training split" in str(err.value)


def test_domain_outside_the_specs_list_is_an_error(csv_dir, small_synthetic):
    spec, _ = small_synthetic  # declares domains 0, 1, 2
    train = pd.read_csv(csv_dir / "train.csv", dtype=str)
    train.loc[0, "domain_id"] = "9"
    train.to_csv(csv_dir / "train.csv", index=False)
    with pytest.raises(DataError, match=r"row 2, column 'domain_id': domain value '9' is not among"):
        MDMTData.build(spec, read_csv(csv_dir, spec))


def test_missing_directory_files_and_too_small_file(tmp_path, small_synthetic):
    spec, _ = small_synthetic
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "train.csv", HEADER + GOOD)
    with pytest.raises(DataError, match="missing val.csv, test.csv"):
        read_csv(tmp_path / "d", spec)
    f = _write(tmp_path / "tiny.csv", HEADER + GOOD * 3)
    with pytest.raises(DataError, match="too few"):
        read_csv(f, spec)


def test_tfrecord_bad_records_name_the_record(tmp_path, small_synthetic):
    import tensorflow as tf

    spec, table = small_synthetic
    from mdmt_tf.data.readers import example_bytes

    records = example_bytes(table.head(3), spec)
    example = tf.train.Example.FromString(records[1])
    del example.features.feature["click"]
    with tf.io.TFRecordWriter(str(tmp_path / "a.tfrecord")) as w:
        for r in (records[0], example.SerializeToString(), records[2]):
            w.write(r)
    with pytest.raises(DataError) as err:
        read_tfrecord(tmp_path / "a.tfrecord", spec)
    assert (err.value.row, err.value.column) == (2, "click") and "missing" in str(err.value)

    with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord")) as w:
        w.write(records[0])
        w.write(b"\x01\x02not a proto")
    with pytest.raises(DataError, match="row 2: record is not a serialized tf.train.Example"):
        read_tfrecord(tmp_path / "b.tfrecord", spec)

    (tmp_path / "c.tfrecord").write_bytes(b"garbage that is not a tfrecord file at all")
    with pytest.raises(DataError, match="not a readable TFRecord file"):
        read_tfrecord(tmp_path / "c.tfrecord", spec)


def test_missing_sparse_value_falls_back_to_empty_string(tmp_path, small_synthetic):
    spec, _ = small_synthetic
    f = _write(tmp_path / "x.csv", HEADER + "0,,i1,F,occ1,z001,c01,30,1,0\n")
    assert read_csv_file(f, spec)["user_id"].iloc[0] == ""  # maps to the OOV bucket, id 0


def test_temporal_split_orders_by_time(tmp_path, small_synthetic):
    from mdmt_tf.data.readers import split_table

    spec, table = small_synthetic
    table = table.copy()
    table["ts"] = np.random.default_rng(0).permutation(len(table)) * 10
    parts = split_table(table, "temporal:ts", 0, "x")
    assert [len(parts[s]) for s in ("train", "val", "test")] == [2400, 300, 300]
    assert parts["train"]["ts"].max() < parts["val"]["ts"].min() <= parts["val"]["ts"].max() < parts["test"]["ts"].min()
    with pytest.raises(DataError, match="temporal split column 'when' is not in the data"):
        split_table(table, "temporal:when", 0, "x")
    with pytest.raises(DataError, match="unknown split 'weekly'"):
        split_table(table, "weekly", 0, "x")
    write_csv(table, tmp_path / "all.csv")
    csv_parts = read_csv(tmp_path / "all.csv", spec, split="temporal:ts")
    assert csv_parts.test["ts"].astype(int).min() > csv_parts.train["ts"].astype(int).max()


def test_directory_split_rejects_a_split_option(csv_dir, small_synthetic):
    spec, _ = small_synthetic
    with pytest.raises(DataError, match="used as given"):
        read_csv(csv_dir, spec, split="temporal:ts")


def test_features_file_without_labels(tmp_path, small_synthetic):
    from mdmt_tf.data.readers import read_features_file

    spec, table = small_synthetic
    write_csv(table.head(20).drop(columns=["click", "like"]), tmp_path / "score.csv")
    rows = read_features_file(tmp_path / "score.csv", spec)
    assert len(rows) == 20 and "click" not in rows and list(rows["user_id"]) == list(table["user_id"].head(20))
    write_tfrecord(table.head(5), tmp_path / "score.tfrecord", spec)
    assert len(read_features_file(tmp_path / "score.tfrecord", spec)) == 5
    _write(tmp_path / "bad.csv", "domain_id,user_id\n0,u1\n")
    with pytest.raises(DataError, match="'item_id'"):
        read_features_file(tmp_path / "bad.csv", spec)


def test_feature_chunks_read_what_the_whole_file_reads(tmp_path, small_synthetic):
    """feature_chunks: the typed rows of read_features_file, a chunk at a time; an error in
    a later chunk names the file's own line (CSV) or record (TFRecord)."""
    from mdmt_tf.data.readers import feature_chunks, read_features_file

    spec, table = small_synthetic
    write_csv(table.head(20).drop(columns=["click", "like"]), tmp_path / "score.csv")
    write_tfrecord(table.head(11), tmp_path / "score.tfrecord", spec)
    for name, rows in (("score.csv", 20), ("score.tfrecord", 11)):
        whole = read_features_file(tmp_path / name, spec)
        chunks = list(feature_chunks(tmp_path / name, spec, rows=3))
        assert [len(c) for c in chunks] == [3] * (rows // 3) + [rows % 3]
        pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), whole)
    bad = table.head(9).drop(columns=["click", "like"]).copy()
    bad["age"] = bad["age"].astype(object)
    bad.loc[bad.index[7], "age"] = "old"
    write_csv(bad, tmp_path / "bad.csv")
    with pytest.raises(DataError, match="row 9.*'age'"):
        list(feature_chunks(tmp_path / "bad.csv", spec, rows=3))
