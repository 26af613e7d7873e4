"""The streaming input path: a sharded TFRecord dataset (mdmt_tf.data.shards) read, parsed,
shuffled and batched in tf.data, never held whole in memory.

`StreamData.scan(directory)` makes one pass over every shard: the training split's value
counts per sparse field, its domains and dense statistics (the vocabularies, as
`Vocabularies.build` computes them in memory), every split's row count, and the checks the
in-memory readers make (a label not 0/1, a non-finite dense value, a missing feature, a
corrupt or truncated shard), each error naming the shard, the record and the column. Then
`batches(split, ...)` streams (features, labels) encoded by the same preprocessing front
the SavedModel exports, and `scored(split, predict)` scores a split batch by batch, keeping
only each row's float32 probabilities, labels and domain (12-20 bytes a row: fine up to
~10^8 rows of a validation or test split on a 24 GB machine; beyond that, sample the split).

Memory: the shuffle buffer (`--shuffle-buffer` serialized records, ~150 bytes each here), the
value counts of the training vocabulary (one entry per distinct id) and the scored splits'
arrays; nothing grows with the training rows.
"""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import tensorflow as tf

from mdmt_tf.data.checks import check_nested_labels, model_is_cascade
from mdmt_tf.data.readers import SPLITS
from mdmt_tf.data.shards import shard_files
from mdmt_tf.data.vocab import Vocabularies
from mdmt_tf.errors import DataError
from mdmt_tf.log import LOG
from mdmt_tf.spec import DatasetSpec

if TYPE_CHECKING:
    from mdmt_tf.models.schema import FeatureSchema

SCAN_BATCH = 65_536
_TYPES = {"bytes_list": tf.string, "int64_list": tf.int64, "float_list": tf.float32}


def _feature_types(path: str, spec: DatasetSpec) -> dict:
    """Each column's tf.Example type, read from the first record of `path`."""
    from tensorflow.core.example import example_pb2

    try:
        first = next(iter(tf.data.TFRecordDataset(path, compression_type="GZIP").take(1)), None)
    except tf.errors.OpError as err:
        raise DataError(f"is not a readable gzip TFRecord shard: {type(err).__name__}", source=path) from None
    if first is None:
        raise DataError("holds no records", source=path)
    example = example_pb2.Example.FromString(first.numpy())
    types = {}
    for name in spec.columns:
        feature = example.features.feature.get(name)
        kind = feature.WhichOneof("kind") if feature is not None else None
        if kind is None and name not in spec.sparse:
            raise DataError(f"feature is missing from the example (it has {sorted(example.features.feature)})",
                            source=path, row=1, column=name)
        types[name] = _TYPES[kind] if kind is not None else tf.string
    return types


class StreamedSplits:
    """Splits streamed from gzip TFRecord files in tf.data: the interface `Run`, the trainer
    factory and the tuner share with the in-memory EncodedData (`rows`, `batches`, `scorer`,
    `sample`, `check_cascade`, and the attributes below). Subclasses parse a batch of
    serialized records into (model inputs, labels): StreamData with the library's front
    from shards, mdmt_tf.training.transformed.TransformedStream with a Transform graph."""

    spec: DatasetSpec
    files: dict[str, list[str]]
    counts: dict[str, int]
    front: object
    schema: "FeatureSchema"
    warmup: list
    unnested: DataError | None  # the first training row whose labels break the task cascade
    file_rows: dict[str, int]  # each file's records

    @property
    def domains(self) -> list[str]:
        raise NotImplementedError

    def rows(self, split: str) -> int:
        return self.counts[split]

    def _parse(self, records) -> tuple[dict, dict]:
        """A batch of serialized records -> (model inputs, labels)."""
        raise NotImplementedError

    def check_cascade(self, model_config) -> None:
        """A cascade model (ESMM) needs nested training labels: the scan's first offending row
        as the error, or one warning line with `allow_unnested` (mdmt_tf.data.checks)."""
        if self.unnested is None or not model_is_cascade(model_config):
            return
        if model_config.resolved_params().get("allow_unnested", False):
            LOG.warning("%s: the training labels are not nested (first: %s); training anyway (allow_unnested=true)",
                        model_config.name, self.unnested)
            return
        message = str(self.unnested).replace("a cascade", f"model {model_config.name} is a cascade", 1)
        raise DataError(message)

    # ------------------------------------------------------------------ batches
    def records(self, split: str, *, shuffle: bool = False, seed: int = 0, keep=None,
                buffer: int = 100_000, files: list[str] | None = None) -> tf.data.Dataset:
        """The split's serialized records. Shuffled (`shuffle` and `buffer` > 0): the shards in a
        seeded order, four read at a time and interleaved, then a seeded shuffle buffer of
        `buffer` records, reshuffled every epoch. Otherwise the files' order, one after the
        other. `keep(record) -> bool` filters; `files` reads those of the split's files only
        (a worker's share)."""
        files = self.files[split] if files is None else files
        data = tf.data.Dataset.from_tensor_slices(files)
        mixed = bool(shuffle and buffer)
        if mixed and len(files) > 1:
            data = data.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        data = data.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                               cycle_length=min(len(files), 4) if mixed else 1, num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True)
        if keep is not None:
            data = data.filter(keep)
        if mixed:
            rows = sum(self.file_rows.get(f, 0) for f in files) or self.rows(split)
            data = data.shuffle(min(buffer, max(1, rows)), seed=seed, reshuffle_each_iteration=True)
        return data

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_remainder: bool = False, keep=None, buffer: int = 100_000) -> tf.data.Dataset:
        """(features, labels) batches of `split`, encoded by the front (see `records`)."""
        data = self.records(split, shuffle=shuffle, seed=seed, keep=keep, buffer=buffer)
        data = data.batch(batch_size, drop_remainder=drop_remainder)
        if keep is None:  # a known number of batches: Keras then knows an epoch's end
            rows = self.rows(split)
            data = data.apply(tf.data.experimental.assert_cardinality(
                rows // batch_size if drop_remainder else -(-rows // batch_size)))
        # under MultiWorkerMirrored every worker reads every shard and keeps its part of each
        # global batch (DATA): equal steps whatever the shards' sizes (FILE auto-shard would
        # give workers unequal rows, and break the asserted cardinality)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        data = data.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        return data.with_options(options)

    def worker_batches(self, split: str, batch_size: int, workers: int, *, seed: int = 0, keep=None,
                       buffer: int = 100_000, kept: float = 1.0, tolerance: float = 0.05):
        """(dataset_fn for `strategy.distribute_datasets_from_function`, steps per epoch), or
        None: each of `workers` workers reads only its own files (FILE sharding) when the
        split's files can be dealt so that every worker's rows are within `tolerance` of the
        others' (largest files first, each to the worker with the fewest rows); else None,
        and the caller shards by DATA. A worker's batches are `batch_size / workers` rows, shuffled and
        repeated; an epoch is the steps of the worker with the fewest rows (`kept`: the
        share of rows `keep` keeps), so every worker takes the same steps and no row is
        weighted above another (a worker's rows left at an epoch's end start the next)."""
        files = self.files[split]
        if workers < 2 or len(files) < workers or any(f not in self.file_rows for f in files):
            return None
        shares: list[list[str]] = [[] for _ in range(workers)]
        rows = [0] * workers
        for path in sorted(files, key=lambda f: (-self.file_rows[f], f)):
            least = rows.index(min(rows))
            shares[least].append(path)
            rows[least] += self.file_rows[path]
        if min(rows) == 0 or max(rows) > (1 + tolerance) * min(rows):
            return None
        per_worker = -(-batch_size // workers)
        steps = max(1, int(min(rows) * kept) // per_worker)

        def dataset_fn(context):
            index = context.input_pipeline_id
            LOG.info("worker %d reads %d of the %d %s files (%s rows)", index, len(shares[index]), len(files),
                     split, f"{rows[index]:,}")
            data = self.records(split, shuffle=True, seed=seed, keep=keep, buffer=buffer, files=sorted(shares[index]))
            data = data.batch(context.get_per_replica_batch_size(batch_size), drop_remainder=True)
            return data.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE).repeat().prefetch(tf.data.AUTOTUNE)

        return dataset_fn, steps

    def scorer(self, model, batch_size: int):
        """split -> ({task: probabilities [N]}, {task: labels [N]}, domain indices [N]), the
        split scored batch by batch by `model` (as EncodedData.scorer)."""
        predict = tf.function(lambda features: model(features, training=False), reduce_retracing=True)
        return lambda split: self._scored(split, predict, batch_size)

    def _scored(self, split: str, predict, batch_size: int) -> tuple[dict, dict, np.ndarray]:
        probs: dict[str, list] = {t: [] for t in self.spec.tasks}
        labels: dict[str, list] = {t: [] for t in self.spec.tasks}
        domain = []
        for features, batch_labels in self.batches(split, batch_size):
            out = predict(features)
            for task in self.spec.tasks:
                probs[task].append(np.asarray(out[task], np.float32).reshape(-1))
                labels[task].append(batch_labels[task].numpy())
            domain.append(features[self.spec.domain].numpy())
        return ({t: np.concatenate(v) for t, v in probs.items()}, {t: np.concatenate(v) for t, v in labels.items()},
                np.concatenate(domain))

    def sample(self, split: str, rows: int | None = None) -> dict[str, np.ndarray]:
        """The first `rows` encoded rows of a split as arrays (plots of gates and scalings;
        default 50,000)."""
        features, _ = next(iter(self.batches(split, rows or 50_000)))
        return {k: v.numpy() for k, v in features.items()}


@dataclasses.dataclass
class StreamData(StreamedSplits):
    """A sharded dataset read in tf.data (see the module doc)."""

    spec: DatasetSpec
    files: dict[str, list[str]]
    vocab: Vocabularies
    counts: dict[str, int]
    types: dict
    front: object = None
    schema: "FeatureSchema" = None  # type: ignore[assignment]  # set by scan
    warmup: list = dataclasses.field(default_factory=list)
    unnested: DataError | None = None  # the first training row whose labels break the task cascade
    file_rows: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        return list(self.vocab.domains)

    # ------------------------------------------------------------------ scan
    @classmethod
    def scan(cls, directory: str | Path, spec: DatasetSpec, min_count: int = 1) -> "StreamData":
        from mdmt_tf.models.schema import FeatureSchema
        from mdmt_tf.preprocessing import FeatureFront

        files = shard_files(directory)
        types = _feature_types(files["train"][0], spec)
        counters: dict[str, collections.Counter] = {n: collections.Counter() for n in spec.sparse
                                                     if not spec.field_vocab(n).hashed}
        moments = {n: [0, 0.0, 0.0] for n in spec.dense}  # count, mean, M2 (Chan et al.'s merge)
        domains: set[str] = set()
        counts = dict.fromkeys(SPLITS, 0)
        file_rows: dict[str, int] = {}
        warmup: list[bytes] = []
        unnested: DataError | None = None
        for split in SPLITS:
            for path in files[split]:
                _check_gzip_complete(path)
                offset = 0  # records of this shard before the batch (errors name the shard's record)
                for records, columns in _read_shard(path, spec, types):
                    _check(columns, spec, path, offset)
                    offset += len(records)
                    counts[split] += len(records)
                    if split == "val" and len(warmup) < 32:
                        warmup.extend(records[:32 - len(warmup)].tolist())
                    if split != "train":
                        continue
                    if unnested is None:
                        try:
                            check_nested_labels({t: columns[t] for t in spec.tasks}, spec.tasks,
                                                rows=np.arange(offset - len(records) + 1, offset + 1), source=path)
                        except DataError as err:
                            unnested = err
                    domains.update(v.decode() for v in np.unique(columns[spec.domain]))
                    for name, counter in counters.items():
                        values, n = np.unique(columns[name], return_counts=True)
                        counter.update(dict(zip(values.tolist(), n.tolist())))
                    for name in spec.dense:
                        _merge_moments(moments[name], columns[name].astype(np.float64))
                file_rows[path] = offset
                LOG.info("scanned %s: %s rows so far", path, f"{sum(counts.values()):,}")
        for split in SPLITS:
            if counts[split] == 0:
                raise DataError(f"the {split} split is empty", source=str(directory))
        if spec.domains is not None:
            unknown = sorted(domains - set(spec.domains))
            if unknown:
                raise DataError(f"domain value {unknown[0]!r} is not among the spec's domains {list(spec.domains)}",
                                source=str(directory), column=spec.domain)
        series = {name: pd.Series({k.decode(): v for k, v in counter.items() if k != b""}, dtype=np.int64)
                  for name, counter in counters.items()}
        mean = {n: float(m[1]) for n, m in moments.items()}
        std = {n: float(np.sqrt(m[2] / m[0])) for n, m in moments.items()}
        vocab = Vocabularies.from_counts(spec, series, sorted(domains), mean, std, min_count)
        data = cls(spec=spec, files=files, vocab=vocab, counts=counts, types=types, warmup=warmup,
                   unnested=unnested, file_rows=file_rows)
        data.front = FeatureFront.from_data(spec, vocab)
        data.schema = FeatureSchema.from_data(spec, vocab)
        return data

    def _parse(self, records):
        spec = self.spec
        parsed = tf.io.parse_example(records, _feature_spec(spec, self.types))
        raw = {spec.domain: _text(parsed[spec.domain])}
        raw.update({n: _text(parsed[n]) for n in spec.sparse})
        raw.update({n: tf.cast(parsed[n], tf.float32) for n in spec.dense})
        labels = {t: tf.cast(parsed[t], tf.float32) for t in spec.tasks}
        return self.front(raw), labels


def read_columns(files: list[str], spec: DatasetSpec):
    """(shard, records of the shard before the batch, {column: NumPy values}) batches of the
    shards, checked as `StreamData.scan` checks them (a label not 0/1, a non-finite dense
    value, a missing feature, a corrupt or truncated shard: a DataError naming the shard, the
    record and the column); text columns as str. For scoring a split without a training scan
    (`mdmt evaluate` and `mdmt predict` on --data shards:DIR)."""
    types = _feature_types(files[0], spec)
    for path in files:
        _check_gzip_complete(path)
        offset = 0
        for _, columns in _read_shard(path, spec, types):
            _check(columns, spec, path, offset)
            for name, values in columns.items():
                if values.dtype == object:
                    columns[name] = values.astype(str)
            yield path, offset, columns
            offset += len(columns[spec.domain])


def _feature_spec(spec: DatasetSpec, types: dict) -> dict:
    """parse_example's features: one value per column; a missing sparse feature is "" (or 0),
    any other missing feature an error."""
    return {name: tf.io.FixedLenFeature([], dtype, default_value=("" if dtype == tf.string else 0)
                                        if name in spec.sparse else None)
            for name, dtype in types.items()}


def _text(x):
    return x if x.dtype == tf.string else tf.strings.as_string(x)


def _read_shard(path: str, spec: DatasetSpec, types: dict):
    """(serialized records, {column: NumPy values}) batches of one shard; a DataError naming
    the shard (and, for a record that does not parse, its number and column)."""
    features = _feature_spec(spec, types)
    data = tf.data.TFRecordDataset(path, compression_type="GZIP").batch(SCAN_BATCH)
    done = 0
    iterator = iter(data)
    while True:
        try:
            records = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as err:
            raise DataError(f"is corrupt or truncated after record {done}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200]}", source=path) from None
        try:
            parsed = tf.io.parse_example(records, features)
        except tf.errors.InvalidArgumentError:
            _locate(path, records.numpy(), spec, done)
            raise
        columns = {k: v.numpy() for k, v in parsed.items()}
        done += len(columns[spec.domain])
        yield records.numpy(), columns


def _locate(path: str, records, spec: DatasetSpec, offset: int) -> None:
    """Raise the DataError of the first record in `records` that does not parse (as the
    in-memory reader words it)."""
    from tensorflow.core.example import example_pb2

    from mdmt_tf.data.readers import _feature_value

    for number, record in enumerate(records, start=offset + 1):
        try:
            example = example_pb2.Example.FromString(record)
        except Exception:  # protobuf's DecodeError
            raise DataError("record is not a serialized tf.train.Example", source=path, row=number) from None
        for name in spec.columns:
            feature = example.features.feature.get(name)
            if feature is None or feature.WhichOneof("kind") is None:
                if name in spec.sparse:
                    continue
                raise DataError(f"feature is missing from the example (it has {sorted(example.features.feature)})",
                                source=path, row=number, column=name)
            try:
                _feature_value(feature)
            except ValueError as err:
                raise DataError(f"feature {err}", source=path, row=number, column=name) from None
    raise DataError("a record does not parse with the types of the first record (a feature changes type)",
                    source=path)


def _check_gzip_complete(path: str, chunk: int = 1 << 20) -> None:
    """A DataError unless the shard's gzip stream reaches its end-of-stream marker: TF's gzip
    reader takes a shard cut at a compression block boundary for a shorter, valid one
    (measured: 7 of 43 random cuts of a 1.1 MB shard read without an error)."""
    import zlib

    stream = zlib.decompressobj(wbits=31)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            while block:
                try:
                    stream.decompress(block, 0)
                except zlib.error as err:
                    raise DataError(f"is corrupt: its gzip stream does not decompress ({err})", source=path) from None
                block = stream.unused_data
                if block:  # a further gzip member follows
                    stream = zlib.decompressobj(wbits=31)
                    block = bytes(block)
    if not stream.eof:
        raise DataError("is truncated: its gzip stream ends before the end-of-stream marker (an interrupted copy "
                        "or write?); rewrite or remove the shard", source=path)


def _check(columns: dict, spec: DatasetSpec, path: str, offset: int) -> None:
    for task in spec.tasks:
        bad = np.flatnonzero(~np.isin(columns[task], (0, 1)))
        if len(bad):
            raise DataError(f"label {columns[task][bad[0]].item()!r} is not 0 or 1", source=path,
                            row=offset + int(bad[0]) + 1, column=task)
    for name in spec.dense:
        bad = np.flatnonzero(~np.isfinite(columns[name].astype(np.float64)))
        if len(bad):
            raise DataError(f"dense value {columns[name][bad[0]].item()!r} is not a finite number", source=path,
                            row=offset + int(bad[0]) + 1, column=name)


def _merge_moments(state: list, values: np.ndarray) -> None:
    """Fold a batch into (count, mean, M2) (Chan, Golub and LeVeque's pairwise update)."""
    n, mean, m2 = state
    k = len(values)
    if k == 0:
        return
    batch_mean = float(values.mean())
    batch_m2 = float(((values - batch_mean) ** 2).sum())
    total = n + k
    delta = batch_mean - mean
    state[0], state[1] = total, mean + delta * k / total
    state[2] = m2 + batch_m2 + delta * delta * n * k / total
