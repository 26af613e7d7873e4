"""Request caps and bounded scoring: a request over --max-request-rows gets TF Serving's
error shape (400 / INVALID_ARGUMENT) naming the limit, before its values are converted;
an allowed request is scored in slices of at most --score-batch-rows rows.

(One 50 MB request of 388k rows once took the stand-in from 1.4 to 11.7 GB and it never
gave the memory back; the figures with these limits are in serving/README.md.)"""
from __future__ import annotations

import base64

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from mdmt_tf.errors import ConfigError
from tests.serving.conftest import LOCAL_BATCH_ROWS, LOCAL_MAX_ROWS, in_process


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def _grpc_predict(process, examples: list[bytes]):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mdmt"
    request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples, dtype=tf.string))
    with grpc.insecure_channel(process.grpc) as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


def _many(examples: list[bytes], n: int) -> list[bytes]:
    return (examples * (n // len(examples) + 1))[:n]


LIMIT_MESSAGE = (f"Request of {LOCAL_MAX_ROWS + 1} rows exceeds this server's limit of {LOCAL_MAX_ROWS} rows "
                 "(--max-request-rows)")


@pytest.mark.parametrize("body", [
    {"instances": ["not even an example"] * (LOCAL_MAX_ROWS + 1)},                     # row format
    {"inputs": {"examples": ["not even an example"] * (LOCAL_MAX_ROWS + 1)}},          # columnar
    {"signature_name": "predict_raw", "inputs": {"age": [0.5] * (LOCAL_MAX_ROWS + 1), "user_id": ["u"]}},
])
def test_rest_requests_over_the_row_cap_are_refused(local_server, body):
    reply = requests.post(f"http://{local_server.rest}/v1/models/mdmt:predict", json=body, timeout=30)
    assert reply.status_code == 400 and reply.json() == {"error": LIMIT_MESSAGE + "; send fewer rows per request"}


def test_grpc_requests_over_the_row_cap_are_refused(local_server, examples):
    with pytest.raises(grpc.RpcError) as info:
        _grpc_predict(local_server, _many(examples, LOCAL_MAX_ROWS + 1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and LIMIT_MESSAGE in info.value.details()


def test_requests_at_the_row_cap_are_scored_in_slices(local_server, models, examples):
    """LOCAL_MAX_ROWS rows pass; the server scores them 16 at a time; the answer is the
    same as one call on all rows."""
    batch = _many(examples, LOCAL_MAX_ROWS)
    want = in_process(models[1], batch)
    reply = requests.post(f"http://{local_server.rest}/v1/models/mdmt:predict",
                          json={"inputs": {"examples": [_b64(e) for e in batch]}}, timeout=60)
    assert reply.status_code == 200, reply.text
    for task, values in reply.json()["outputs"].items():
        np.testing.assert_allclose(values, want[task], atol=1e-6)
    answer = _grpc_predict(local_server, batch)
    for task, proto in answer.outputs.items():
        np.testing.assert_allclose(tf.make_ndarray(proto), want[task], atol=1e-6)


class Recorder:
    """Wraps a signature's concrete function; records the rows of every call."""

    def __init__(self, function):
        self.function, self.rows = function, []

    def __call__(self, **tensors):
        self.rows.append(int(next(iter(tensors.values())).shape[0]))
        return self.function(**tensors)


def test_servable_calls_the_model_in_slices_of_at_most_batch_rows(models, examples):
    from serving.devserver.servable import Servable

    servable = Servable("mdmt", 1, models[1], batch_rows=LOCAL_BATCH_ROWS)
    recorder = servable._functions["serving_default"] = Recorder(servable._functions["serving_default"])
    batch = np.array(examples, dtype=object)  # 40 rows
    outputs = servable.predict("serving_default", {"examples": batch})
    assert recorder.rows == [16, 16, 8]
    want = in_process(models[1], examples)
    for task in want:
        np.testing.assert_allclose(outputs[task], want[task], atol=1e-6)
    recorder.rows.clear()
    servable.predict("serving_default", {"examples": batch[:LOCAL_BATCH_ROWS]})
    assert recorder.rows == [LOCAL_BATCH_ROWS]


def test_an_error_in_a_later_slice_names_the_row_of_the_request(models, examples):
    from serving.devserver.servable import Servable
    from serving.devserver.status import StatusError

    servable = Servable("mdmt", 1, models[1], batch_rows=LOCAL_BATCH_ROWS)
    batch = np.array(examples, dtype=object)
    batch[21] = b"\x00\x01 not a proto"
    with pytest.raises(StatusError, match=r"examples\[21\] is not a serialized tf.train.Example") as info:
        servable.predict("serving_default", {"examples": batch})
    assert info.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("option,value,words", [("max_request_rows", 0, "--max-request-rows"),
                                                ("score_batch_rows", 0, "--score-batch-rows"),
                                                ("rest_workers", 0, "--rest-workers"),
                                                ("read_timeout", 0, "--read-timeout")])
def test_limit_options_are_checked(tmp_path, option, value, words):
    from serving.devserver.server import ServerOptions

    with pytest.raises(ConfigError, match=words):
        ServerOptions(tmp_path, **{option: value})
