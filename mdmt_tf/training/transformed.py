"""Training on TFX artifacts: raw examples + a Transform graph (used by components/module.py).

The pipeline's Trainer reads the raw examples of ExampleGen and applies the Transform
graph itself (`TransformFront`), in training and in the exported SavedModel alike, so
what is served is exactly what was trained. This module imports tensorflow-transform,
never TFX: the TFX module file converts its `fn_args` into the plain arguments of
`train_from_artifacts`.

The Trainer and the Tuner stream the splits (`TransformedStream`): ExampleGen's gzip
TFRecords are read, shuffled in a bounded buffer, batched, parsed and transformed inside
`tf.data.Dataset.map`; no split is held in memory. One pass over each split first counts its
rows (the steps of an epoch) and checks the task cascade of the training labels.

Why the Transform layer in tf.data rather than Transform's materialized output read
through TFX's data accessor (measured on 160,000 ExampleGen rows of the synthetic data, 2
cores; docs/scaling.md): reading the materialized examples is faster on its own (447-489k
against 228-305k examples/s), but a training epoch costs the same within noise (MMoE 40.1k
against 45.8k examples/s, M3oE 15.7k against 14.3k: the model step dominates), while
materializing costs Transform a second write of every split and the Trainer its raw
examples (the warmup requests, and the check that training applies the very graph that is
served). MAMDR's strategies (`dn`, `dr`, `mamdr`) train per domain from arrays: with
them the splits are read into memory (`encoded_from_artifacts`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from mdmt_tf.data.checks import check_nested_labels
from mdmt_tf.data.stream import StreamedSplits
from mdmt_tf.errors import DataError
from mdmt_tf.log import LOG
from mdmt_tf.models import FeatureSchema, ModelConfig
from mdmt_tf.spec import DatasetSpec
from mdmt_tf.transform import DOMAIN_VOCABULARY


class TransformFront(tf.Module):
    """Raw features (typed as ExampleGen typed them) -> model inputs via the Transform graph.

    An unknown domain value fails with InvalidArgument naming the domain column, like the
    library's FeatureFront.
    """

    def __init__(self, transform_output_dir: str, spec: DatasetSpec, domains: list[str]):
        super().__init__(name="transform_front")
        import tensorflow_transform as tft

        output = tft.TFTransformOutput(transform_output_dir)
        self.tft_layer = output.transform_features_layer()
        self.spec, self.domains = spec, list(domains)
        self._full_raw_spec = output.raw_feature_spec()
        self._raw_spec = {k: v for k, v in self._full_raw_spec.items() if k in spec.features}

    @property
    def raw_types(self) -> dict:
        return {name: feature.dtype for name, feature in self._raw_spec.items()}

    def transform_examples(self, serialized):
        """Serialized raw tf.Examples (labels included) -> every transformed feature: the
        `transform_features` signature, for analysis."""
        features = tf.io.parse_example(serialized, self._full_raw_spec)
        return {name: tf.reshape(value, [-1]) for name, value in self.tft_layer(features).items()}

    def __call__(self, raw: dict) -> dict:
        inputs = {}
        for name, feature in self._raw_spec.items():
            value = tf.reshape(raw[name], [-1])
            if isinstance(feature, tf.io.FixedLenFeature):
                value = tf.reshape(value, [-1, *feature.shape])  # e.g. [batch, 1] from infer_feature_shape
            elif isinstance(feature, tf.io.VarLenFeature):  # a sparse raw feature: one value per row
                rows = tf.range(tf.shape(value, out_type=tf.int64)[0])
                value = tf.SparseTensor(tf.stack([rows, tf.zeros_like(rows)], 1), value,
                                        tf.stack([tf.shape(value, out_type=tf.int64)[0], 1]))
            inputs[name] = value
        return self.encode(self.tft_layer(inputs))

    def encode(self, out: dict) -> dict:
        """The Transform layer's outputs -> model inputs (int32 ids, float32 dense values); an
        unknown domain fails with InvalidArgument naming the column."""
        spec = self.spec
        domain = tf.cast(tf.reshape(out[spec.domain], [-1]), tf.int32)
        check = tf.debugging.assert_non_negative(
            domain, message=f"unknown value of domain column '{spec.domain}'; known values: {self.domains}")
        with tf.control_dependencies([check]):
            encoded = {spec.domain: tf.identity(domain)}
        for name in spec.sparse:
            encoded[name] = tf.cast(tf.reshape(out[name], [-1]), tf.int32)
        for name in spec.dense:
            encoded[name] = tf.cast(tf.reshape(out[name], [-1]), tf.float32)
        return encoded


def domain_list(spec: DatasetSpec, transform_output_dir: str) -> list[str]:
    import tensorflow_transform as tft

    if spec.domains is not None:
        return list(spec.domains)
    vocab = tft.TFTransformOutput(transform_output_dir).vocabulary_by_name(DOMAIN_VOCABULARY)
    return [v.decode() if isinstance(v, bytes) else str(v) for v in vocab]


def feature_schema(spec: DatasetSpec, transform_output_dir: str, domains: list[str]) -> FeatureSchema:
    import tensorflow_transform as tft

    output = tft.TFTransformOutput(transform_output_dir)
    sizes = tuple((name, _table_rows(output, spec, name)) for name in spec.sparse)
    return FeatureSchema(domain=spec.domain, domains=tuple(domains), tasks=spec.tasks, sparse=sizes,
                         dense=spec.dense)


def _files(patterns) -> list[str]:
    """The files of TFX's split patterns (local or remote: tf.io.gfile); a pattern naming a
    directory stands for its files."""
    out = []
    for pattern in ([patterns] if isinstance(patterns, str) else patterns):
        found = sorted(tf.io.gfile.glob(pattern)) or sorted(tf.io.gfile.glob(pattern.rstrip("/") + "/*"))
        if not found:
            raise DataError("matches no files", source=pattern)
        out.extend(found)
    return out


COUNT_BATCH = 65_536


@dataclasses.dataclass
class TransformedStream(StreamedSplits):
    """ExampleGen's splits streamed through the Transform graph (see the module doc): train,
    and eval as both the validation and the run's test split (the Evaluator scores the
    held-out test split)."""

    spec: DatasetSpec
    files: dict[str, list[str]]
    counts: dict[str, int]
    front: TransformFront
    schema: FeatureSchema
    warmup: list
    unnested: DataError | None
    raw_spec: dict
    domain_names: list[str]
    file_rows: dict[str, int]

    @property
    def domains(self) -> list[str]:
        return list(self.domain_names)

    @classmethod
    def from_artifacts(cls, train_files, eval_files, transform_output_dir: str,
                       spec: DatasetSpec) -> "TransformedStream":
        import tensorflow_transform as tft

        domains = domain_list(spec, transform_output_dir)
        raw_spec = tft.TFTransformOutput(transform_output_dir).raw_feature_spec()
        files = {"train": _files(train_files), "val": _files(eval_files)}
        files["test"] = files["val"]
        labels_spec = {t: raw_spec[t] for t in spec.tasks}
        counts: dict[str, int] = {}
        warmup: list[bytes] = []
        unnested: DataError | None = None
        file_rows: dict[str, int] = {}
        for split in ("train", "val"):
            counts[split], first, found = _count(files[split], labels_spec, spec, file_rows, check=split == "train")
            warmup = warmup or first
            unnested = unnested or found
            LOG.info("%s split: %s rows in %d files", split, f"{counts[split]:,}", len(files[split]))
        counts["test"] = counts["val"]
        return cls(spec=spec, files=files, counts=counts, front=TransformFront(transform_output_dir, spec, domains),
                   schema=feature_schema(spec, transform_output_dir, domains), warmup=warmup, unnested=unnested,
                   raw_spec=raw_spec, domain_names=domains, file_rows=file_rows)

    def _parse(self, records):
        out = self.front.tft_layer(tf.io.parse_example(records, self.raw_spec))
        labels = {t: tf.cast(tf.reshape(out[t], [-1]), tf.float32) for t in self.spec.tasks}
        return self.front.encode(out), labels


def _count(files: list[str], labels_spec: dict, spec: DatasetSpec, file_rows: dict, check: bool):
    """(rows, the first 32 serialized records, the first cascade violation or None) of the
    files, from one pass parsing the labels only (each file's rows into `file_rows`); a
    DataError names a file that does not read."""
    rows = 0
    first: list[bytes] = []
    unnested: DataError | None = None
    for path in files:
        offset = 0
        try:
            for records in tf.data.TFRecordDataset(path, compression_type="GZIP").batch(COUNT_BATCH):
                if not first:
                    first = [bytes(x) for x in records.numpy()[:32]]
                if check and unnested is None:
                    labels = tf.io.parse_example(records, labels_spec)
                    columns = {t: np.asarray(labels[t]).reshape(-1) for t in spec.tasks}
                    try:
                        check_nested_labels(columns, spec.tasks, rows=np.arange(offset + 1, offset + len(records) + 1),
                                            source=path)
                    except DataError as err:
                        unnested = err
                offset += int(records.shape[0])
        except tf.errors.OpError as err:
            raise DataError(f"is corrupt or truncated after record {offset}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200]}", source=path) from None
        rows += offset
        file_rows[path] = offset
    if rows == 0:
        raise DataError("hold no records", source=", ".join(files[:3]))
    return rows, first, unnested


def read_split(files, transform_output_dir: str, spec: DatasetSpec, batch_size: int = 8192):
    """Raw TFRecord examples -> (model inputs, labels, first serialized examples)."""
    import tensorflow_transform as tft

    output = tft.TFTransformOutput(transform_output_dir)
    raw_spec = output.raw_feature_spec()
    layer = output.transform_features_layer()
    records = tf.data.TFRecordDataset(_files(files), compression_type="GZIP").batch(batch_size)
    parts: dict[str, list] = {}
    first: list[bytes] = []
    for serialized in records:
        if not first:
            first = [bytes(x) for x in serialized.numpy()[:32]]
        out = layer(tf.io.parse_example(serialized, raw_spec))
        for name in (*spec.features, *spec.tasks):
            parts.setdefault(name, []).append(np.asarray(out[name]).reshape(-1))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    features = {spec.domain: arrays[spec.domain].astype(np.int32)}
    features.update({n: arrays[n].astype(np.int32) for n in spec.sparse})
    features.update({n: arrays[n].astype(np.float32) for n in spec.dense})
    labels = {t: arrays[t].astype(np.float32) for t in spec.tasks}
    return features, labels, first


def encoded_from_artifacts(train_files, eval_files, transform_output_dir: str, spec: DatasetSpec):
    """EncodedData for the Trainer: train and eval splits (eval doubles as the run's test
    split; the Evaluator scores the held-out test split)."""
    from mdmt_tf.training.encoded import EncodedData

    domains = domain_list(spec, transform_output_dir)
    train = read_split(train_files, transform_output_dir, spec)
    evaluation = read_split(eval_files, transform_output_dir, spec)
    features = {"train": train[0], "val": evaluation[0], "test": evaluation[0]}
    labels = {"train": train[1], "val": evaluation[1], "test": evaluation[1]}
    domain = {s: features[s][spec.domain] for s in features}
    return EncodedData(spec=spec, domains=domains, front=TransformFront(transform_output_dir, spec, domains),
                       schema=feature_schema(spec, transform_output_dir, domains), features=features,
                       labels=labels, domain=domain, warmup=evaluation[2])


def train_from_artifacts(*, train_files, eval_files, transform_output_dir: str, serving_model_dir: str,
                         run_dir: str, spec: dict, model: dict, train: dict, tuned_values: dict | None = None,
                         source: str = "tfx") -> dict:
    """Train a model on the pipeline's artifacts and export it to `serving_model_dir`.

    spec: DatasetSpec as a dict; model: ModelConfig as a dict; train: TrainConfig fields;
    tuned_values: the Tuner's best values (mdmt_tf.tuning naming), which override both.
    Writes the run's checkpoints, metrics.json and plots to `run_dir`; returns the
    metrics.json payload.
    """
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.fit import Run
    from mdmt_tf.training.runtime import distribution_strategy

    dataset_spec = DatasetSpec.from_dict(spec)
    model_config = ModelConfig.from_dict(model)
    if tuned_values:
        from mdmt_tf.tuning.hypermodel import split_values

        params, train_overrides = split_values(tuned_values)
        model_config = ModelConfig(model_config.name, {**model_config.params, **params})
        if "balance" in train_overrides:  # the searched method, with the configured balance settings
            train_overrides["balance"] = {**(train.get("balance") or {}), **train_overrides["balance"]}
        train = {**train, **train_overrides}
    config = TrainConfig.from_dict(train)
    # a TFJob worker's MultiWorkerMirrored strategy exists before the row count's TF ops
    # (collective ops must be configured at program startup)
    strategy = distribution_strategy(config.distribute)
    data = data_from_artifacts(train_files, eval_files, transform_output_dir, dataset_spec, config)
    run = Run(model_config, data, config, run_dir, source=source, verbose=2, model_dir=serving_model_dir,
              strategy=strategy)
    return run.run()


def data_from_artifacts(train_files, eval_files, transform_output_dir: str, spec: DatasetSpec, config):
    """The splits as the run under `config` reads them: streamed (TransformedStream), or in
    memory for MAMDR's per-domain strategies (see the module doc)."""
    if config.strategy == "plain":
        return TransformedStream.from_artifacts(train_files, eval_files, transform_output_dir, spec)
    LOG.info("--strategy %s trains per domain from arrays: reading the splits into memory", config.strategy)
    return encoded_from_artifacts(train_files, eval_files, transform_output_dir, spec)


def _table_rows(output, spec: DatasetSpec, name: str) -> int:
    """A sparse field's ids (its embedding table's rows) after Transform: the vocabulary and
    its OOV buckets, or the hash bins (mdmt_tf.data.idmap)."""
    rule = spec.field_vocab(name)
    if rule.hash_bins is not None:
        return rule.hash_bins
    return output.vocabulary_size_by_name(name) + rule.oov_buckets
