"""Structural CSV checks that run before the local pipeline starts (no TFX run needed)."""
import gzip
import shutil

import pytest

from mdmt_tf.errors import DataError
from tests.pipeline.conftest import make_config


def _copy(pipeline_data, tmp_path):
    data_root, spec = pipeline_data
    bad = tmp_path / "data"
    shutil.copytree(data_root, bad)
    return bad, spec


def _lines(path):
    return path.read_text().splitlines(keepends=True)


def test_clean_inputs_pass(pipeline_data, tmp_path):
    from pipeline.preflight import check_csv_inputs

    data_root, spec = pipeline_data
    check_csv_inputs(make_config(tmp_path, data_root, spec))  # no error


def test_a_row_with_an_extra_field_is_named_by_file_and_line(pipeline_data, tmp_path):
    from pipeline.preflight import check_csv_inputs

    bad, spec = _copy(pipeline_data, tmp_path)
    lines = _lines(bad / "val.csv")
    lines[7] = lines[7].rstrip("\n") + ",surplus\n"  # line 8 of the file (header = line 1)
    (bad / "val.csv").write_text("".join(lines))
    width = len(lines[0].split(","))
    with pytest.raises(DataError, match=rf"val\.csv, row 8: {width + 1} fields where the header has {width}"):
        check_csv_inputs(make_config(tmp_path, bad, spec))


def test_a_missing_spec_column_and_gzip_inputs(pipeline_data, tmp_path):
    import pandas as pd

    from pipeline.preflight import check_csv_inputs

    bad, spec = _copy(pipeline_data, tmp_path)
    table = pd.read_csv(bad / "test.csv", dtype=str).drop(columns=["age"])
    (bad / "test.csv").unlink()
    with gzip.open(bad / "test.csv.gz", "wt") as handle:
        table.to_csv(handle, index=False)
    with pytest.raises(DataError, match=r"test\.csv\.gz, row 1, column 'age': missing column\(s\) \['age'\]"):
        check_csv_inputs(make_config(tmp_path, bad, spec))


def test_the_local_runner_stops_before_any_component(pipeline_data, tmp_path):
    from pipeline.local_runner import run

    bad, spec = _copy(pipeline_data, tmp_path)
    lines = _lines(bad / "train.csv")
    lines[3] = ",".join(lines[3].split(",")[:-2]) + "\n"  # two fields short
    (bad / "train.csv").write_text("".join(lines))
    config = make_config(tmp_path, bad, spec)
    with pytest.raises(DataError, match=r"train\.csv, row 4"):
        run(config)
    assert not (tmp_path / "metadata.sqlite").exists()  # nothing ran
