"""The pipeline's Trainer streams ExampleGen's records through the Transform graph
(mdmt_tf.training.transformed.TransformedStream): the same metrics as reading the splits
into memory, rows counted, the cascade checked, a bad file named. A Transform output is
made in-process with tensorflow-transform's Beam API (no TFX run)."""
import gzip
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.data.readers import random_split, write_tfrecord
from mdmt_tf.data.synthetic import SyntheticConfig, generate, synthetic_spec
from mdmt_tf.errors import DataError
from mdmt_tf.models import ModelConfig
from mdmt_tf.training.config import TrainConfig

CONFIG = SyntheticConfig(rows=3000, users=200, items=100, seed=5)
SPEC = synthetic_spec(CONFIG)


def _raw_feature_spec():
    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in (SPEC.domain, *SPEC.sparse)}
    spec.update({name: tf.io.FixedLenFeature([], tf.float32) for name in SPEC.dense})
    spec.update({name: tf.io.FixedLenFeature([], tf.int64) for name in SPEC.tasks})
    return spec


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(train files, eval files, transform output dir): gzip TFRecords as ExampleGen writes
    them (two training files) and the Transform graph analyzed on the training split."""
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io, schema_utils

    from mdmt_tf.transform import preprocessing_fn

    root = tmp_path_factory.mktemp("transformed")
    splits = random_split(generate(CONFIG), 0, "synthetic")
    train = splits["train"]
    half = len(train) // 2
    write_tfrecord(train.iloc[:half], root / "train-0.gz", SPEC)
    write_tfrecord(train.iloc[half:], root / "train-1.gz", SPEC)
    write_tfrecord(splits["val"], root / "eval-0.gz", SPEC)
    feature_spec = _raw_feature_spec()
    meta = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(feature_spec))
    rows = [{name: (str(r[name]).encode() if spec.dtype == tf.string else r[name])
             for name, spec in feature_spec.items()} for r in train.to_dict("records")]
    with tft_beam.Context(temp_dir=tempfile.mkdtemp()):
        transform_fn = (rows, meta) | tft_beam.AnalyzeDataset(lambda inputs: preprocessing_fn(inputs, SPEC))
        _ = transform_fn | tft_beam.WriteTransformFn(str(root / "transform"))
    metadata_io.write_metadata(meta, str(root / "transform" / tft.TFTransformOutput.RAW_METADATA_DIR))
    return [str(root / "train-*.gz")], [str(root / "eval-*")], str(root / "transform")


def _run(data, tmp, name):
    from mdmt_tf.training.fit import Run

    model = ModelConfig("mmoe", {"expert_units": [8], "tower_units": [4], "embedding_dim": 4})
    config = TrainConfig(epochs=1, batch_size=256, shuffle_buffer=0, seed=3)
    return Run(model, data, config, tmp / name, verbose=0, export=False, plots=False).run()


def test_streamed_and_in_memory_training_agree(artifacts, tmp_path):
    from mdmt_tf.training.transformed import TransformedStream, encoded_from_artifacts

    train, evaluation, transform = artifacts
    streamed = TransformedStream.from_artifacts(train, evaluation, transform, SPEC)
    in_memory = encoded_from_artifacts(train, evaluation, transform, SPEC)
    for split in ("train", "val", "test"):
        assert streamed.rows(split) == in_memory.rows(split)
    assert streamed.rows("train") == 2400 and streamed.domains == in_memory.domains
    assert len(streamed.warmup) == 32

    features, _ = next(iter(streamed.batches("train", 5000)))
    for name, values in features.items():
        np.testing.assert_array_equal(values.numpy(), in_memory.features["train"][name][:5000], err_msg=name)

    a, b = _run(streamed, tmp_path, "streamed"), _run(in_memory, tmp_path, "memory")
    for key in ("mean_auc", "mean_logloss", "weighted_auc"):
        assert a["val"][key] == pytest.approx(b["val"][key], abs=1e-6), key
    assert a["val"]["mean_auc"] > 0.5


def test_the_trainer_streams_unless_mamdr_needs_arrays(artifacts):
    from mdmt_tf.training.encoded import EncodedData
    from mdmt_tf.training.transformed import TransformedStream, data_from_artifacts

    train, evaluation, transform = artifacts
    assert isinstance(data_from_artifacts(train, evaluation, transform, SPEC, TrainConfig()), TransformedStream)
    mamdr = data_from_artifacts(train, evaluation, transform, SPEC, TrainConfig(strategy="mamdr"))
    assert isinstance(mamdr, EncodedData)


def test_unnested_labels_name_the_file_and_record(artifacts, tmp_path):
    from mdmt_tf.training.transformed import TransformedStream

    _, evaluation, transform = artifacts
    table = random_split(generate(CONFIG), 0, "synthetic")["train"].head(50).copy()
    table.loc[table.index[7], ["click", "like"]] = [0, 1]  # a like without a click: record 8
    write_tfrecord(table, tmp_path / "bad.gz", SPEC)
    stream = TransformedStream.from_artifacts([str(tmp_path / "bad.gz")], evaluation, transform, SPEC)
    stream.check_cascade(ModelConfig("mmoe", {}))  # not a cascade: nothing to check
    with pytest.raises(DataError, match=r"bad\.gz.*8"):
        stream.check_cascade(ModelConfig("esmm", {}))


def test_a_corrupt_file_is_named(artifacts, tmp_path):
    from mdmt_tf.training.transformed import TransformedStream

    train, evaluation, transform = artifacts
    good = sorted(tf.io.gfile.glob(train[0]))[0]
    data = gzip.decompress(open(good, "rb").read())
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data[: len(data) // 2]))  # a record cut in the middle
    with pytest.raises(DataError, match=r"cut\.gz.*corrupt or truncated"):
        TransformedStream.from_artifacts([str(tmp_path / "cut.gz")], evaluation, transform, SPEC)
    with pytest.raises(DataError, match="matches no files"):
        TransformedStream.from_artifacts([str(tmp_path / "none-*")], evaluation, transform, SPEC)


def test_a_bilevel_search_streams_through_the_transform_graph(artifacts, tmp_path):
    """The architecture steps read a held-out stream whose map runs the Transform graph: the
    run checkpoints without that iterator (its lookup tables cannot be serialized) and
    resumes."""
    from mdmt_tf.training.fit import Run
    from mdmt_tf.training.transformed import TransformedStream

    train, evaluation, transform = artifacts
    data = TransformedStream.from_artifacts(train, evaluation, transform, SPEC)
    model = ModelConfig("m3oe", {"bottom_units": [16, 8], "expert_units": [8], "tower_units": [4], "embedding_dim": 4})
    config = TrainConfig(epochs=1, batch_size=256, arch_mode="bilevel", precision="float32")
    first = Run(model, data, config, tmp_path / "run", verbose=0, export=False, plots=False).run()
    assert first["steps"]["architecture"] == first["steps"]["weight"] > 0
    more = Run(model, data, TrainConfig(epochs=2, batch_size=256, arch_mode="bilevel", precision="float32"),
               tmp_path / "run", verbose=0, export=False, plots=False).run()
    assert more["epochs_trained"] == 2 and more["steps"]["weight"] > first["steps"]["weight"]


def test_two_tfjob_workers_stream_the_artifacts(artifacts, tmp_path):
    """What a TFJob's pods run (`mdmt pipeline tfjob-worker --fn-args`), as two processes on
    loopback: the strategy is made before the stream's row count (collective ops must be
    configured at program startup), both workers stream the Transform graph's batches, end
    with identical weights, and only the chief exports."""
    import json
    import os
    import sys

    from tests.cluster import launch_workers

    train, evaluation, transform = artifacts
    payload = {"train_files": train, "eval_files": evaluation, "transform_graph_path": transform,
               "serving_model_dir": str(tmp_path / "serving"), "model_run_dir": str(tmp_path / "run"),
               "hyperparameters": None,
               "custom_config": {"spec": SPEC.to_dict(),
                                 "model": {"name": "mmoe", "params": {"expert_units": [8], "tower_units": [4],
                                                                      "embedding_dim": 4}},
                                 "train": {"epochs": 1, "batch_size": 256, "precision": "float32",
                                           "distribute": "multiworker"}}}
    (tmp_path / "fn_args.json").write_text(json.dumps(payload))
    workers = launch_workers([sys.executable, "-m", "mdmt_tf", "pipeline", "tfjob-worker", "--fn-args",
                              str(tmp_path / "fn_args.json")], {**os.environ, "PYTHONPATH": os.getcwd()})
    outputs = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]
        outputs.append(stdout + stderr)
    # the two training files (1,200 rows each) deal evenly: each worker reads its own, in
    # batches of 128, for the steps of its 1,200 rows
    for index, output in enumerate(outputs):
        assert f"worker {index} reads 1 of the 2 train files" in output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["steps"]["weight"] == 1200 // 128
    assert (tmp_path / "serving" / "saved_model.pb").exists()
    chief = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last"))
    other = tf.train.load_checkpoint(str(tmp_path / "run" / "workers" / "worker-1" / "checkpoints" / "last"))
    names = [n for n, _ in tf.train.list_variables(str(tmp_path / "run" / "checkpoints" / "last"))
             if n.endswith(".ATTRIBUTES/VARIABLE_VALUE")]
    assert len(names) > 10
    for name in names:
        np.testing.assert_array_equal(chief.get_tensor(name), other.get_tensor(name), err_msg=name)
