"""Client timeouts: a server slower than `timeout` gives ServingError DEADLINE_EXCEEDED, promptly.

The fake servers answer metadata at once (the client fetches the signature's input dtypes
first) and hold Predict for SERVER_DELAY s, far longer than the client's TIMEOUT. A timed
out request is not retried (only UNAVAILABLE / 502-504 are), so even with retries the
call returns after about one timeout.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from mdmt_tf.errors import MdmtError
from serving.client import ServingClient
from serving.errors import ServingError
from tests.serving.conftest import FakeHandler, LoopbackHttp

TIMEOUT = 0.5
SERVER_DELAY = 10.0
BOUND = 3.0  # the call must return well before the server would have answered

SIGNATURE_DEF = {"signature_def": {"serving_default": {
    "inputs": {"examples": {"dtype": "DT_STRING", "tensor_shape": {"dim": [{"size": "-1"}]}, "name": "examples:0"}},
    "outputs": {"click": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}]}, "name": "out:0"}},
    "method_name": "tensorflow/serving/predict"}}}


class SlowHttp:
    """TF Serving's REST metadata at once; every :predict sleeps (until released) before answering."""

    def __init__(self):
        self.release, self.predicts = threading.Event(), 0
        owner = self

        class Handler(FakeHandler):
            def _send(self, doc):
                self.send_body(200, json.dumps(doc).encode(), "application/json")

            def do_GET(self):
                self._send({"model_spec": {"name": "mdmt", "signature_name": "", "version": "1"},
                            "metadata": {"signature_def": SIGNATURE_DEF}})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.predicts += 1
                owner.release.wait(SERVER_DELAY)
                try:
                    self._send({"outputs": {"click": [0.5]}})
                except OSError:  # the client hung up
                    pass

        self.http = LoopbackHttp(Handler)
        self.target = self.http.target

    def close(self):
        self.release.set()
        self.http.close()


class SlowPrediction(prediction_service_pb2_grpc.PredictionServiceServicer):
    """GetModelMetadata at once; Predict sleeps (until released) before answering."""

    def __init__(self):
        self.release, self.predicts = threading.Event(), 0

    def GetModelMetadata(self, request, context):
        signatures = get_model_metadata_pb2.SignatureDefMap()
        definition = signatures.signature_def["serving_default"]
        definition.method_name = "tensorflow/serving/predict"
        definition.inputs["examples"].name = "examples:0"
        definition.inputs["examples"].dtype = types_pb2.DT_STRING
        definition.outputs["click"].name = "out:0"
        definition.outputs["click"].dtype = types_pb2.DT_FLOAT
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.metadata["signature_def"].Pack(signatures)
        return response

    def Predict(self, request, context):
        self.predicts += 1
        self.release.wait(SERVER_DELAY)
        response = predict_pb2.PredictResponse()
        response.outputs["click"].CopyFrom(tf.make_tensor_proto([0.5], dtype=tf.float32))
        return response


@pytest.fixture()
def slow_rest():
    fake = SlowHttp()
    yield fake
    fake.close()


@pytest.fixture()
def slow_grpc():
    service = SlowPrediction()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    service.release.set()
    server.stop(0)


def _timed_predict(client) -> tuple[ServingError, float]:
    client.metadata()  # fetched at once: only Predict is slow
    start = time.monotonic()
    with pytest.raises(ServingError) as info:
        client.predict_examples([b"x"])
    return info.value, time.monotonic() - start


def _check(err: ServingError, elapsed: float, protocol: str) -> None:
    assert isinstance(err, MdmtError)
    assert (err.protocol, err.code, err.attempts) == (protocol, "DEADLINE_EXCEEDED", 1)
    assert not err.retryable
    assert f"{protocol.upper()} DEADLINE_EXCEEDED" in str(err)
    assert TIMEOUT * 0.9 <= elapsed < BOUND, f"returned after {elapsed:.2f} s with timeout {TIMEOUT} s"


def test_rest_timeout_is_deadline_exceeded(slow_rest):
    with ServingClient(slow_rest.target, timeout=TIMEOUT, retries=2, backoff=0.01) as client:
        err, elapsed = _timed_predict(client)
    _check(err, elapsed, "rest")
    assert f"no answer within {TIMEOUT} s" in err.message
    assert slow_rest.predicts == 1, "a timed-out request is not retried"


def test_grpc_timeout_is_deadline_exceeded(slow_grpc):
    service, target = slow_grpc
    with ServingClient(target, protocol="grpc", timeout=TIMEOUT, retries=2, backoff=0.01) as client:
        err, elapsed = _timed_predict(client)
    _check(err, elapsed, "grpc")
    assert "deadline" in err.message.lower()
    assert service.predicts == 1, "a timed-out request is not retried"


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_fast_enough_server_is_not_cut_off(slow_rest, slow_grpc, protocol):
    """The same fakes answer within a generous timeout once released: the timeout is what failed above."""
    slow_rest.release.set()
    slow_grpc[0].release.set()
    target = slow_rest.target if protocol == "rest" else slow_grpc[1]
    with ServingClient(target, protocol=protocol, timeout=5, retries=0) as client:
        outputs = client.predict_examples([b"x"])
    assert list(outputs) == ["click"]
    np.testing.assert_allclose(outputs["click"], [0.5])


class TrickleHttp(SlowHttp):
    """Answers :predict at once but sends the body one byte every 0.1 s: each read is quick,
    the whole answer takes seconds."""

    def __init__(self):
        super().__init__()
        owner = self

        class Handler(self.http.server.RequestHandlerClass):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.predicts += 1
                payload = json.dumps({"outputs": {"click": [0.5]}, "pad": " " * 40}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    for i in range(len(payload)):
                        self.wfile.write(payload[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:  # the client hung up
                    pass

        self.http.server.RequestHandlerClass = Handler


def test_rest_timeout_bounds_the_whole_answer_not_each_read():
    fake = TrickleHttp()
    try:
        with ServingClient(fake.target, timeout=TIMEOUT, retries=0) as client:
            err, elapsed = _timed_predict(client)
    finally:
        fake.close()
    _check(err, elapsed, "rest")
