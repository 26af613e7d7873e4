"""assets.extra/tf_serving_warmup_requests: what the export writes and how the servable replays it.

The `models` fixture trains with `mdmt_tf.training.fit.train`, which exports the first 32
validation rows of `serving_data` as warmup examples (`EncodedData.warmup`), written by
`write_warmup_requests` in batches of 8.
"""
from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import prediction_log_pb2

from tests.serving.conftest import in_process

WARMUP_ROWS, WARMUP_BATCH = 32, 8  # fit.EncodedData.from_data, savedmodel.write_warmup_requests


def read_warmup(model_dir) -> list[prediction_log_pb2.PredictionLog]:
    path = model_dir / "assets.extra" / "tf_serving_warmup_requests"
    assert path.is_file(), f"no warmup file in {model_dir}"
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


def warmup_examples(logs) -> list[list[bytes]]:
    """The serialized examples of each request, as lists of bytes."""
    return [[bytes(b) for b in tf.make_ndarray(entry.predict_log.request.inputs["examples"]).reshape(-1)]
            for entry in logs]


def test_warmup_requests_are_serving_default_predict_logs(models):
    logs = read_warmup(models[1])
    assert len(logs) == math.ceil(WARMUP_ROWS / WARMUP_BATCH)
    for entry in logs:
        assert entry.WhichOneof("log_type") == "predict_log"
        request = entry.predict_log.request
        assert request.model_spec.name == "mdmt"
        assert request.model_spec.signature_name == "serving_default"
        assert list(request.inputs) == ["examples"]
        tensor = request.inputs["examples"]
        assert tensor.dtype == tf.string.as_datatype_enum
        assert [d.size for d in tensor.tensor_shape.dim] == [WARMUP_BATCH]


def test_warmup_examples_are_the_real_rows_exported_from(models, serving_data):
    spec = serving_data.spec
    examples = [e for batch in warmup_examples(read_warmup(models[1])) for e in batch]
    table = serving_data.splits.val.head(WARMUP_ROWS).reset_index(drop=True)
    assert len(examples) == len(table) == WARMUP_ROWS
    for index, record in enumerate(examples):
        feature = example_pb2.Example.FromString(record).features.feature
        assert set(feature) == set(spec.features), "warmup examples hold the features only, no labels"
        row = table.iloc[index]
        for name in (spec.domain, *spec.sparse):
            assert list(feature[name].bytes_list.value) == [str(row[name]).encode()], (index, name)
        for name in spec.dense:
            assert feature[name].float_list.value[0] == pytest.approx(float(row[name]), rel=1e-6), (index, name)
            assert len(feature[name].float_list.value) == 1
    assert len(set(examples)) > 1, "the rows differ, so matching them in order means something"


def test_warmup_requests_replay_through_the_loaded_signature(models):
    signature = tf.saved_model.load(str(models[1])).signatures["serving_default"]
    tasks = set(signature.structured_outputs)
    replayed = []
    for entry in read_warmup(models[1]):
        request = entry.predict_log.request
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        outputs = {k: v.numpy() for k, v in signature(**inputs).items()}
        assert set(outputs) == tasks and tasks
        for values in outputs.values():
            assert values.shape == (WARMUP_BATCH,) and np.all((values >= 0) & (values <= 1))
        replayed.append(outputs)
    # batched replay equals scoring all the warmup examples at once
    everything = [e for batch in warmup_examples(read_warmup(models[1])) for e in batch]
    reference = in_process(models[1], everything)
    for task in tasks:
        np.testing.assert_allclose(np.concatenate([r[task] for r in replayed]), reference[task], atol=1e-6)


def test_servable_replays_every_warmup_record(models):
    from serving.devserver.servable import Servable

    servable = Servable("mdmt", 1, models[1])
    assert servable.warm_up() == len(read_warmup(models[1])) == 4


def test_servable_replay_count_follows_the_file(models, examples, tmp_path):
    """A rewritten warmup file (20 examples in batches of 8: 3 records) replays 3 requests."""
    from mdmt_tf.export.savedmodel import write_warmup_requests
    from serving.devserver.servable import Servable

    model = tmp_path / "1"
    shutil.copytree(models[1], model)
    write_warmup_requests(model / "assets.extra" / "tf_serving_warmup_requests", examples[:20], batch=8)
    assert [len(b) for b in warmup_examples(read_warmup(model))] == [8, 8, 4]
    assert Servable("mdmt", 1, model).warm_up() == 3


def test_servable_without_warmup_file_logs_info_and_serves(models, examples, tmp_path, caplog):
    from serving.devserver.servable import Servable

    model = tmp_path / "1"
    shutil.copytree(models[1], model)
    (model / "assets.extra" / "tf_serving_warmup_requests").unlink()
    servable = Servable("mdmt", 1, model)
    with caplog.at_level(logging.INFO, logger="serving"):
        assert servable.warm_up() == 0
    records = [r for r in caplog.records if r.name == "serving"]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "no warmup file found" in records[0].getMessage()
    assert "tf_serving_warmup_requests" in records[0].getMessage()
    outputs = servable.predict("serving_default", {"examples": np.array(examples[:2], dtype=object)})
    assert all(v.shape == (2,) for v in outputs.values())
