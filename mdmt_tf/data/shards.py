"""Sharded TFRecord datasets: the layout the streaming input path reads.

A directory holds `train-00000-of-00008.tfrecord.gz`, ..., `val-*`, `test-*` (gzip
TFRecords of tf.train.Example, one per row, as `write_tfrecord` writes them) and a
`spec.yaml`. `mdmt data synthetic --format tfrecord --shards K` writes one in chunks.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from mdmt_tf.data.readers import SPLITS, example_bytes
from mdmt_tf.errors import DataError
from mdmt_tf.log import LOG
from mdmt_tf.spec import DatasetSpec

_SHARD = re.compile(r"^(train|val|test)-(\d+)-of-(\d+)\.tfrecord(\.gz)?$")
FRACTIONS = (0.8, 0.1, 0.1)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord.gz"


def shard_files(directory: str | Path) -> dict[str, list[str]]:
    """{split: its shard paths, sorted}; a DataError naming what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("is not a directory of train-*/val-*/test-* TFRecord shards", source=str(directory))
    found: dict[str, list[str]] = {s: [] for s in SPLITS}
    for path in sorted(directory.iterdir()):
        match = _SHARD.match(path.name)
        if match:
            found[match.group(1)].append(str(path))
    missing = [s for s in SPLITS if not found[s]]
    if missing:
        raise DataError(f"holds no shards for {missing}: a sharded dataset has files named like "
                        f"{shard_name('train', 0, 8)} for each of {list(SPLITS)} (mdmt data synthetic "
                        "--format tfrecord --shards K writes one)", source=str(directory))
    return found


def write_sharded_synthetic(config, out: str | Path, shards: int, chunk_rows: int = 250_000) -> dict[str, int]:
    """Write `config.rows` synthetic rows as `shards` gzip TFRecord shards per split (rows
    split 80/10/10 at random, seeded; round-robin over a split's shards), a chunk at a time;
    returns the rows per split."""
    import tensorflow as tf

    from mdmt_tf.data.synthetic import generate_chunks, synthetic_spec

    if shards < 1:
        raise DataError(f"--shards must be >= 1, got {shards}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec: DatasetSpec = synthetic_spec(config)
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    writers = {s: [tf.io.TFRecordWriter(str(out / shard_name(s, i, shards)), options) for i in range(shards)]
               for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    start = time.perf_counter()
    try:
        for chunk, table in enumerate(generate_chunks(config, chunk_rows)):
            draw = np.random.default_rng([config.seed, 3, chunk]).random(len(table))
            split_of = np.where(draw < FRACTIONS[0], 0, np.where(draw < FRACTIONS[0] + FRACTIONS[1], 1, 2))
            for index, split in enumerate(SPLITS):
                for record in example_bytes(table[split_of == index], spec):
                    writers[split][counts[split] % shards].write(record)
                    counts[split] += 1
            done = sum(counts.values())
            LOG.info("wrote %d / %d rows (%.0f rows/s)", done, config.rows, done / (time.perf_counter() - start))
    finally:
        for split_writers in writers.values():
            for writer in split_writers:
                writer.close()
    spec.to_yaml(out / "spec.yaml")
    return counts
