"""Resolve a `--data` argument into a spec and typed train/val/test splits.

  synthetic[:ROWS]   the embedded synthetic MDMT generator (default 60,000 rows)
  csv:PATH           a CSV file (split 80/10/10) or a directory with train/val/test.csv
  tfrecord:PATH      a TFRecord file of tf.Example or a directory with train/val/test.tfrecord
  ml100k:DIR         the raw MovieLens-100K files, converted on the fly
  shards:DIR         sharded gzip TFRecords (train-*/val-*/test-*), streamed by `mdmt train / tune / compare / evaluate`
                     (mdmt_tf.data.stream), never loaded whole
  PATH               csv or tfrecord, told by the file suffix / directory contents

For csv and tfrecord the spec comes from --spec, or from `spec.yaml` in the data
directory (what `mdmt data ...` writes).
"""
from __future__ import annotations

from pathlib import Path

from mdmt_tf.data.readers import CSV_SUFFIXES, TFRECORD_SUFFIXES, Splits, read_csv, read_tfrecord, split_table
from mdmt_tf.errors import ConfigError, DataError
from mdmt_tf.spec import DatasetSpec

KINDS = ("synthetic", "csv", "tfrecord", "ml100k", "shards")
USAGE = "synthetic[:ROWS] | csv:PATH | tfrecord:PATH | ml100k:DIR | shards:DIR | PATH"


def parse_source(text: str) -> tuple[str, str]:
    """'csv:/x' -> ('csv', '/x'); a bare path is typed by its suffix or contents."""
    kind, sep, rest = text.partition(":")
    if sep and kind in KINDS:
        return kind, rest
    if text in KINDS:
        return text, ""
    path = Path(text)
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        if any(n.endswith(CSV_SUFFIXES) for n in names):
            return "csv", text
        if any(n.endswith(TFRECORD_SUFFIXES) for n in names):
            return "tfrecord", text
    elif text.endswith(CSV_SUFFIXES):
        return "csv", text
    elif text.endswith(TFRECORD_SUFFIXES):
        return "tfrecord", text
    raise ConfigError(f"--data {text!r} is not a data source; use {USAGE}")


def resolve_spec(path: Path, spec_path: str | Path | None) -> DatasetSpec:
    if spec_path is not None:
        return DatasetSpec.from_yaml(spec_path)
    candidate = (path if path.is_dir() else path.parent) / "spec.yaml"
    if candidate.exists():
        return DatasetSpec.from_yaml(candidate)
    raise ConfigError(f"no dataset spec for {path}: pass --spec SPEC.yaml (domain, tasks, sparse, dense) "
                      f"or put a spec.yaml next to the data")


def load_source(text: str, spec_path: str | Path | None = None, split_seed: int = 0,
                split: str = "random") -> tuple[DatasetSpec, Splits]:
    """split: "random" (seeded 80/10/10) or "temporal:COLUMN", for sources that are one table."""
    kind, rest = parse_source(text)
    if kind == "shards":
        raise ConfigError(f"--data {text}: sharded data is streamed by `mdmt train`, `tune`, `compare` and "
                          "`evaluate`; for this command write the data as train/val/test files (csv: or tfrecord:)")
    if kind == "synthetic":
        from mdmt_tf.data.synthetic import SyntheticConfig, generate, synthetic_spec

        try:
            config = SyntheticConfig(rows=int(rest)) if rest else SyntheticConfig()
        except ValueError:
            raise ConfigError(f"--data synthetic:ROWS needs an integer row count, got {rest!r}") from None
        if spec_path is not None:
            raise ConfigError("--spec does not apply to --data synthetic (its spec is built in)")
        parts = split_table(generate(config), split, split_seed, source="synthetic")
        return synthetic_spec(config), Splits(**parts, sources={s: f"synthetic ({s})" for s in parts})
    if kind == "ml100k":
        from mdmt_tf.data.movielens import ML100K_SPEC, load_ml100k

        table = load_ml100k(rest)
        parts = split_table(table, split, split_seed, source=rest)
        return ML100K_SPEC, Splits(**parts, sources={s: f"{rest} (ml100k, {s})" for s in parts})
    path = Path(rest)
    if not path.exists():
        raise DataError("does not exist", source=str(path))
    spec = resolve_spec(path, spec_path)
    reader = read_csv if kind == "csv" else read_tfrecord
    return spec, reader(path, spec, seed=split_seed, split=split)
