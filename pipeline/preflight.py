"""Structural checks of local CSV inputs before the pipeline starts.

CsvExampleGen fails deep inside Beam on a malformed file (a row with too many or too few
fields, a header without a spec column), with a parser traceback that names neither the
file nor the line. Local runs read the files once here first (~0.2 s per 100k rows) and
stop with a DataError naming the file, line and column. Value-level problems (a label of
2, a non-numeric dense value) are left to StatisticsGen / ExampleValidator: that is the
pipeline's data validation, and it covers remote data too.
"""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

from mdmt_tf.errors import DataError

from .config import PipelineConfig, is_remote


def csv_files(config: PipelineConfig) -> list[Path]:
    root = Path(config.data_root)
    if not root.is_dir():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_file() and (p.suffix == ".csv" or p.name.endswith(".csv.gz")))


def check_csv_inputs(config: PipelineConfig) -> None:
    """Raise DataError for the first structural problem in the CSV inputs; no-op for TFRecord
    and for remote inputs (StatisticsGen / ExampleValidator check those)."""
    if is_remote(config.data_root) or config.format != "csv":
        return
    files = csv_files(config)
    if not files:
        raise DataError(f"no .csv or .csv.gz files in {config.data_root}; write train.csv / val.csv / test.csv "
                        "there, or point data_root at one CSV file")
    for path in files:
        _check_file(path, config.dataset_spec)


def _check_file(path: Path, spec) -> None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise DataError("the file is empty; it needs a header row naming the columns", source=str(path), row=1)
        missing = spec.missing_columns(header)
        if missing:
            raise DataError(f"missing column(s) {missing} that the spec names; the header has {header}",
                            source=str(path), row=1, column=missing[0])
        width, rows = len(header), 0
        for row in reader:
            rows += 1
            if len(row) != width and row:
                raise DataError(f"{len(row)} fields where the header has {width}; fix the row (a stray or missing "
                                "delimiter, or an unquoted comma in a value)", source=str(path), row=reader.line_num)
        if rows == 0:
            raise DataError("the file has a header but no rows", source=str(path), row=2)
