"""CSV and TFRecord readers: files -> typed train/val/test tables.

A path is either
  * a directory holding train / val / test files (`train.csv`, `val.csv`, `test.csv`,
    optionally gzipped; or `train.tfrecord[.gz]` ...). That split is honoured exactly.
  * a single file, split by a seeded random 80/10/10 (rows keep their line numbers in
    error messages).

Row numbers in errors: for CSV the 1-based line of the file (the header is line 1, so
the first data row is row 2); for TFRecord the 1-based record number.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from mdmt_tf.data.table import ROW, coerce_table
from mdmt_tf.errors import DataError
from mdmt_tf.spec import DatasetSpec

SPLITS = ("train", "val", "test")
CSV_SUFFIXES = (".csv", ".csv.gz")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecord.gz", ".tfrecords", ".tfrecords.gz")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclasses.dataclass
class Splits:
    """Typed train / val / test tables and where each came from."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    sources: dict[str, str]

    def __getitem__(self, split: str) -> pd.DataFrame:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; valid: {SPLITS}")
        return getattr(self, split)

    def items(self) -> Iterator[tuple[str, pd.DataFrame]]:
        for split in SPLITS:
            yield split, self[split]


def _split_files(directory: Path, suffixes: tuple[str, ...], kind: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split in SPLITS:
        for suffix in suffixes:
            candidate = directory / f"{split}{suffix}"
            if candidate.exists():
                found[split] = candidate
                break
    missing = [s for s in SPLITS if s not in found]
    if missing:
        names = ", ".join(f"{s}{suffixes[0]}" for s in missing)
        present = sorted(p.name for p in directory.iterdir())[:10]
        raise DataError(f"a {kind} directory must hold train, val and test files; missing {names} "
                        f"(found {present}). Or pass a single file to split it 80/10/10.",
                        source=str(directory))
    return found


def random_split(table: pd.DataFrame, seed: int, source: str,
                 fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict[str, pd.DataFrame]:
    """Seeded random split of one table into train / val / test by `fractions`."""
    n = len(table)
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    for split, idx in parts.items():
        if len(idx) == 0:
            raise DataError(f"has {n} data rows, too few for a {fractions} train/val/test split: "
                            f"the {split} split would be empty", source=source)
    return {split: table.iloc[np.sort(idx)].reset_index(drop=True) for split, idx in parts.items()}


def temporal_split(table: pd.DataFrame, column: str, source: str,
                   fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict[str, pd.DataFrame]:
    """Split by time: the earliest 80 % of rows (by `column`) train, the next 10 % val,
    the latest 10 % test. Ties keep file order. Users and items first seen late are then
    cold-start in val / test, as in production."""
    if column not in table.columns:
        present = [c for c in table.columns if c != ROW]
        raise DataError(f"temporal split column {column!r} is not in the data (columns: {present})", source=source)
    keys = pd.to_numeric(table[column], errors="coerce")
    if keys.isna().any():
        bad = int(np.flatnonzero(keys.isna().to_numpy())[0])
        raise DataError(f"value {table[column].iloc[bad]!r} is not a number; a temporal split needs numeric "
                        "times", source=source, row=int(table[ROW].iloc[bad]), column=column)
    order = np.argsort(keys.to_numpy(), kind="mergesort")
    n = len(order)
    n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for split, idx in parts.items():
        if len(idx) == 0:
            raise DataError(f"has {n} data rows, too few for a temporal split: the {split} split would be empty",
                            source=source)
    return {split: table.iloc[idx].reset_index(drop=True) for split, idx in parts.items()}


def split_table(table: pd.DataFrame, split: str, seed: int, source: str) -> dict[str, pd.DataFrame]:
    """split: "random" (seeded 80/10/10) or "temporal:COLUMN"."""
    if split == "random":
        return random_split(table, seed, source)
    kind, _, column = split.partition(":")
    if kind == "temporal" and column:
        return temporal_split(table, column, source)
    raise DataError(f"unknown split {split!r}; use 'random' or 'temporal:COLUMN'", source=source)


# ----------------------------------------------------------------------------- CSV
def read_csv_file(path: Path, spec: DatasetSpec, labels: bool = True) -> pd.DataFrame:
    """One CSV file -> typed table (see mdmt_tf.data.table). labels=False: label columns
    are optional (data to score)."""
    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", source=str(path))
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise DataError("is empty (no header, no rows)", source=str(path)) from None
    except pd.errors.ParserError as err:
        raise DataError(f"is not valid CSV: {err}", source=str(path)) from None
    raw.columns = [c.strip() for c in raw.columns]
    raw[ROW] = np.arange(2, len(raw) + 2)  # line numbers; the header is line 1
    return coerce_table(raw, spec, source=str(path), header_row=1, labels=labels)


def _check_directory_split(path: Path, split: str) -> None:
    if split != "random":
        raise DataError(f"holds train/val/test files, which are used as given; --split {split} applies to a "
                        "single file", source=str(path))


def _single_file_sources(path: Path, split: str) -> dict[str, str]:
    how = "a seeded 80/10/10 split" if split == "random" else f"a {split} split"
    return {s: f"{path} ({s} part of {how})" for s in SPLITS}


def _read_splits(path, spec: DatasetSpec, seed: int, split: str, read_file, suffixes, kind: str) -> Splits:
    """A directory of train/val/test files as given, or one file split by `split`."""
    path = Path(path)
    if path.is_dir():
        _check_directory_split(path, split)
        files = _split_files(path, suffixes, kind)
        tables = {s: read_file(f, spec) for s, f in files.items()}
        return Splits(**tables, sources={s: str(f) for s, f in files.items()})
    parts = split_table(read_file(path, spec), split, seed, str(path))
    return Splits(**parts, sources=_single_file_sources(path, split))


def read_csv(path: str | Path, spec: DatasetSpec, seed: int = 0, split: str = "random") -> Splits:
    return _read_splits(path, spec, seed, split, read_csv_file, CSV_SUFFIXES, "CSV")


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    table.drop(columns=[ROW], errors="ignore").to_csv(path, index=False)


def read_features_file(path: str | Path, spec: DatasetSpec) -> pd.DataFrame:
    """A file to score (CSV or TFRecord, by suffix or content): typed rows in file order;
    label columns optional."""
    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", source=str(path))
    if str(path).endswith(TFRECORD_SUFFIXES):
        return read_tfrecord_file(path, spec, labels=False)
    return read_csv_file(path, spec, labels=False)


def feature_chunks(path: str | Path, spec: DatasetSpec, rows: int = 100_000) -> Iterator[pd.DataFrame]:
    """read_features_file `rows` rows at a time (memory bounded by the chunk): typed tables
    in file order, checked as read_features_file checks them (an error names the file, its
    line or record, and the column)."""
    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", source=str(path))
    if str(path).endswith(TFRECORD_SUFFIXES):
        yield from _tfrecord_chunks(path, spec, labels=False, rows=rows)
        return
    try:
        reader = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, chunksize=rows)
        first_line = 2  # the header is line 1
        for raw in reader:
            raw.columns = [c.strip() for c in raw.columns]
            raw[ROW] = np.arange(first_line, first_line + len(raw))
            first_line += len(raw)
            yield coerce_table(raw, spec, source=str(path), header_row=1, labels=False)
    except pd.errors.EmptyDataError:
        raise DataError("is empty (no header, no rows)", source=str(path)) from None
    except pd.errors.ParserError as err:
        raise DataError(f"is not valid CSV: {err}", source=str(path)) from None


# ------------------------------------------------------------------------ TFRecord
def _iter_records(path: Path) -> Iterator[bytes]:
    import tensorflow as tf  # TF only when TFRecords are read

    with open(path, "rb") as fh:
        compression = "GZIP" if fh.read(2) == b"\x1f\x8b" else ""
    yield from (r.numpy() for r in tf.data.TFRecordDataset(str(path), compression_type=compression))


def _feature_value(feature) -> object:
    kind = feature.WhichOneof("kind")
    if kind is None:
        return None
    values = getattr(feature, kind).value
    if len(values) == 0:
        return None
    if len(values) > 1:
        raise ValueError(f"has {len(values)} values; each feature holds one value per example")
    return values[0]


def read_tfrecord_file(path: Path, spec: DatasetSpec, labels: bool = True) -> pd.DataFrame:
    """A TFRecord file of tf.train.Example -> typed table. Missing sparse features are
    '' (OOV); a missing domain, label or dense feature is an error naming the record
    (labels=False: labels may be missing, data to score)."""
    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", source=str(path))
    return pd.concat(list(_tfrecord_chunks(path, spec, labels, rows=None)), ignore_index=True)


def _tfrecord_chunks(path: Path, spec: DatasetSpec, labels: bool, rows: int | None) -> Iterator[pd.DataFrame]:
    """read_tfrecord_file's typed tables, `rows` records at a time (None: one table)."""
    from tensorflow.core.example import example_pb2

    wanted = spec.columns if labels else spec.features
    columns: dict[str, list] = {c: [] for c in wanted}
    first = 1  # the chunk's first record number
    number = 0
    try:
        for number, record in enumerate(_iter_records(path), start=1):
            example = example_pb2.Example()
            try:
                example.ParseFromString(record)
            except Exception:  # protobuf's DecodeError
                raise DataError("record is not a serialized tf.train.Example", source=str(path), row=number) from None
            feats = example.features.feature
            for name in wanted:
                if name not in feats:
                    if name in spec.sparse:
                        columns[name].append("")
                        continue
                    raise DataError(f"feature is missing from the example (it has {sorted(feats)})",
                                    source=str(path), row=number, column=name)
                try:
                    columns[name].append(_feature_value(feats[name]))
                except ValueError as err:
                    raise DataError(f"feature {err}", source=str(path), row=number, column=name) from None
            if rows is not None and number - first + 1 == rows:
                yield _typed_chunk(columns, first, spec, path, labels)
                columns, first = {c: [] for c in wanted}, number + 1
    except DataError:
        raise
    except Exception as err:  # corrupted file, wrong format (tf.errors.DataLossError...)
        raise DataError(f"is not a readable TFRecord file: {type(err).__name__}: {str(err)[:200]}",
                        source=str(path)) from None
    if number >= first or first == 1:  # the last partial chunk (or an empty file's error)
        yield _typed_chunk(columns, first, spec, path, labels)


def _typed_chunk(columns: dict, first: int, spec: DatasetSpec, path: Path, labels: bool) -> pd.DataFrame:
    table = pd.DataFrame(columns)
    table[ROW] = np.arange(first, first + len(table))
    return coerce_table(table, spec, source=str(path), header_row=None, labels=labels)


def read_tfrecord(path: str | Path, spec: DatasetSpec, seed: int = 0, split: str = "random") -> Splits:
    return _read_splits(path, spec, seed, split, read_tfrecord_file, TFRECORD_SUFFIXES, "TFRecord")


def example_bytes(table: pd.DataFrame, spec: DatasetSpec, with_labels: bool = True) -> list[bytes]:
    """Serialize typed rows as tf.train.Example: sparse and domain as bytes, dense as
    float, labels as int64."""
    from tensorflow.core.example import example_pb2, feature_pb2

    out = []
    text_cols = [spec.domain, *spec.sparse]
    label_cols = list(spec.tasks) if with_labels else []
    records = table.to_dict("records")
    for row in records:
        feature = {}
        for name in text_cols:
            feature[name] = feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[str(row[name]).encode()]))
        for name in spec.dense:
            feature[name] = feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[float(row[name])]))
        for name in label_cols:
            feature[name] = feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(row[name])]))
        out.append(example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString())
    return out


def write_tfrecord(table: pd.DataFrame, path: str | Path, spec: DatasetSpec) -> None:
    """Write typed rows as a TFRecord of tf.train.Example (gzip when the name ends .gz)."""
    import tensorflow as tf

    path = str(path)
    options = tf.io.TFRecordOptions(compression_type="GZIP" if path.endswith(".gz") else "")
    with tf.io.TFRecordWriter(path, options) as writer:
        for record in example_bytes(table, spec):
            writer.write(record)

