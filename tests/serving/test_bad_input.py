"""Bad requests get 400 / INVALID_ARGUMENT (or 404 / NOT_FOUND...) naming the field, never a
5xx, and the server stays up. Status codes are checked against every server fixture;
the dev stand-in's messages (which name the field even where TF Serving's do not) only
against it."""
from __future__ import annotations

import base64

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from tests.serving.conftest import ServerProcess


def _columns(raw, **changes) -> dict:
    cols = {k: [str(x) if v.dtype.kind in "OUS" else float(x) for x in v[:2]] for k, v in raw.items()}
    cols.update(changes)
    return {k: v for k, v in cols.items() if v is not None}


def _post(process: ServerProcess, body, path: str = "mdmt:predict") -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else None
    return requests.post(f"http://{process.rest}/v1/models/{path}", data=data,
                         json=None if data is not None else body, timeout=30)


def _example(**features) -> bytes:
    from tensorflow.core.example import example_pb2, feature_pb2

    feature = {}
    for name, value in features.items():
        if isinstance(value, str):
            feature[name] = feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[value.encode()]))
        elif isinstance(value, float):
            feature[name] = feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[value]))
        else:
            feature[name] = feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[value]))
    return example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString()


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


# name -> (body builder(raw), path, HTTP status, words the dev server's message must contain)
REST_CASES = {
    "missing feature (columnar)": (lambda raw: {"signature_name": "predict_raw", "inputs": _columns(raw, age=None)},
                                   "mdmt:predict", 400, ["age"]),
    "missing feature (row)": (lambda raw: {"signature_name": "predict_raw", "instances": [
        {k: v[0] for k, v in _columns(raw, age=None).items()}]}, "mdmt:predict", 400, ["age", "element: 0"]),
    "string for a float": (lambda raw: {"signature_name": "predict_raw", "inputs": _columns(raw, age=["x", "y"])},
                           "mdmt:predict", 400, ["age", "float"]),
    "number for a string (row)": (lambda raw: {"signature_name": "predict_raw", "instances": [
        {**{k: v[0] for k, v in _columns(raw).items()}, "user_id": 5}]}, "mdmt:predict", 400, ["user_id", "string"]),
    "float that loses precision": (lambda raw: {"signature_name": "predict_raw", "inputs": _columns(
        raw, age=[1e39, 1.0])}, "mdmt:predict", 400, ["age", "loss of precision"]),
    "unequal batch sizes": (lambda raw: {"signature_name": "predict_raw", "inputs": _columns(raw, age=[1.0])},
                            "mdmt:predict", 400, ["age", "0th-dimension"]),
    "malformed tf.Example": (lambda raw: {"instances": [_b64(b"\x00\x01 not a proto")]}, "mdmt:predict", 400,
                             ["examples[0]", "tf.train.Example"]),
    "tf.Example missing a dense feature": (lambda raw: {"instances": [_b64(_example(domain_id="0"))]},
                                           "mdmt:predict", 400, ["age", "required"]),
    "tf.Example with an int dense feature": (lambda raw: {"instances": [_b64(_example(domain_id="0", age=3))]},
                                             "mdmt:predict", 400, ["age", "int64"]),
    "unknown domain": (lambda raw: {"instances": [_b64(_example(domain_id="nine", age=1.0))]}, "mdmt:predict",
                       400, ["domain_id", "unknown value"]),
    "bad base64": (lambda raw: {"instances": [{"b64": "@@@"}]}, "mdmt:predict", 400, ["base64"]),
    "unknown signature": (lambda raw: {"signature_name": "nope", "instances": ["x"]}, "mdmt:predict", 400,
                          ['"nope"', "not found"]),
    "signature name not a string": (lambda raw: {"signature_name": 5, "instances": ["x"]}, "mdmt:predict", 400,
                                    ["signature_name"]),
    "unknown version": (lambda raw: {"instances": ["x"]}, "mdmt/versions/9:predict", 404,
                        ["Servable not found", "Specific(mdmt, 9)"]),
    "unknown model": (lambda raw: {"instances": ["x"]}, "other:predict", 404, ["Latest(other)"]),
    "no inputs or instances": (lambda raw: {"signature_name": "serving_default"}, "mdmt:predict", 400,
                               ["'inputs' or 'instances'"]),
    "both inputs and instances": (lambda raw: {"inputs": ["x"], "instances": ["x"]}, "mdmt:predict", 400,
                                  ["only one of"]),
    "empty instances": (lambda raw: {"instances": []}, "mdmt:predict", 400, ["No values"]),
    "instances not a list": (lambda raw: {"instances": {"a": 1}}, "mdmt:predict", 400, ["list/array"]),
    "plain list for many inputs": (lambda raw: {"signature_name": "predict_raw", "instances": [1, 2]},
                                   "mdmt:predict", 400, ["plain list"]),
    "ragged rows": (lambda raw: {"inputs": [["a", "b"], ["c"]]}, "mdmt:predict", 400, ["unexpected size"]),
    "invalid JSON": (lambda raw: b'{"instances": [', "mdmt:predict", 400, ["JSON Parse error"]),
    "empty body": (lambda raw: b"", "mdmt:predict", 400, ["empty"]),
    "not an object": (lambda raw: b"[1, 2]", "mdmt:predict", 400, ["Is not object"]),
}


@pytest.mark.parametrize("case", sorted(REST_CASES))
def test_rest_bad_input(server, raw, case):
    build, path, status, words = REST_CASES[case]
    reply = _post(server, build(raw), path)
    assert reply.status_code == status, reply.text
    message = reply.json()["error"]
    if server.kind == "local":
        for word in words:
            assert word in message, (word, message)
    assert server.alive()


@pytest.mark.parametrize("case", ["missing feature (columnar)", "unknown domain", "unknown version"])
def test_client_surfaces_status_and_server_message(server, raw, case):
    """ServingError carries the HTTP status / gRPC code and the server's own message."""
    from serving.errors import ServingError

    build, path, status, words = REST_CASES[case]
    body = build(raw)
    for protocol in ("rest", "grpc"):
        version = 9 if case == "unknown version" else None
        with server.client(protocol, version=version, retries=0) as client:
            with pytest.raises(ServingError) as info:
                if "inputs" in body:
                    client.predict_raw(body["inputs"])
                else:
                    client.predict_examples([base64.b64decode(body["instances"][0]["b64"])]
                                            if isinstance(body["instances"][0], dict) else [b"x"])
        err = info.value
        expected = status if protocol == "rest" else ("NOT_FOUND" if status == 404 else "INVALID_ARGUMENT")
        assert err.code == expected and not err.retryable and err.attempts == 1
        assert words[0] in err.message and words[0] in str(err)


def _grpc_predict(process: ServerProcess, inputs: dict, signature: str = "", version: int | None = None,
                  label: str | None = None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mdmt"
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(value if not isinstance(value, np.ndarray) else tf.make_tensor_proto(value))
    with grpc.insecure_channel(process.grpc) as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


def _raw_tensors(raw, **changes) -> dict:
    tensors = {k: tf.make_tensor_proto(v[:2].astype(object if v.dtype.kind in "OUS" else np.float32).tolist()
                                       if v.dtype.kind not in "OUS" else [s.encode() for s in v[:2]],
                                       dtype=tf.string if v.dtype.kind in "OUS" else tf.float32)
               for k, v in raw.items()}
    tensors.update(changes)
    return {k: v for k, v in tensors.items() if v is not None}


GRPC_CASES = {
    "missing feature": (lambda raw: (_raw_tensors(raw, age=None), "predict_raw", {}), "INVALID_ARGUMENT", ["age"]),
    "wrong dtype": (lambda raw: (_raw_tensors(raw, age=tf.make_tensor_proto([b"a", b"b"])), "predict_raw", {}),
                    "INVALID_ARGUMENT", ["age", "float"]),
    "malformed tf.Example": (lambda raw: ({"examples": tf.make_tensor_proto([b"\x00\x01 junk"])}, "", {}),
                             "INVALID_ARGUMENT", ["examples[0]"]),
    "unknown domain": (lambda raw: ({"examples": tf.make_tensor_proto([_example(domain_id="nine", age=1.0)])},
                                    "", {}), "INVALID_ARGUMENT", ["domain_id"]),
    "unknown signature": (lambda raw: ({"examples": tf.make_tensor_proto([b"x"])}, "nope", {}),
                          "FAILED_PRECONDITION", ['"nope"']),
    "unknown version": (lambda raw: ({"examples": tf.make_tensor_proto([b"x"])}, "", {"version": 9}),
                        "NOT_FOUND", ["Specific(mdmt, 9)"]),
    "unparsable tensor": (lambda raw: ({"examples": _bad_tensor()}, "", {}), "INVALID_ARGUMENT", ["examples"]),
}


def _bad_tensor():
    proto = tf.make_tensor_proto(np.zeros(3, np.float32))
    proto.tensor_content = b"\x00" * 5  # not a multiple of 4 bytes
    return proto


@pytest.mark.parametrize("case", sorted(GRPC_CASES))
def test_grpc_bad_input(server, raw, case):
    build, code, words = GRPC_CASES[case]
    inputs, signature, spec = build(raw)
    with pytest.raises(grpc.RpcError) as info:
        _grpc_predict(server, inputs, signature, **spec)
    assert info.value.code().name == code, info.value.details()
    if server.kind == "local":
        for word in words:
            assert word in info.value.details(), (word, info.value.details())
    assert server.alive()


def test_grpc_metadata_and_unimplemented(local_server):
    with grpc.insecure_channel(local_server.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["bogus"])
        request.model_spec.name = "mdmt"
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelMetadata(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bogus" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(classification_pb2.ClassificationRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_labels(local_server, examples):
    from serving.errors import ServingError

    with local_server.client("rest", version_label="stable") as client:
        assert set(client.predict_examples(examples[:2])) == {"click", "like"}
    for protocol, code in (("rest", 400), ("grpc", "INVALID_ARGUMENT")):
        with local_server.client(protocol, version_label="nope", retries=0) as client:
            with pytest.raises(ServingError, match="Unrecognized servable version label: nope") as info:
                client.predict({"examples": [b"x"]}, signature="serving_default") if protocol == "grpc" else \
                    _raise_rest(local_server, "mdmt/labels/nope:predict")
            assert info.value.code == code
    reply = _post(local_server, {"instances": ["x"]}, "mdmt/labels/missing:predict")  # label -> version 7, absent
    assert reply.status_code == 404 and "Specific(mdmt, 7)" in reply.json()["error"]


def _raise_rest(process, path):
    from serving.errors import ServingError

    reply = _post(process, {"instances": ["x"]}, path)
    raise ServingError("rest", reply.status_code, reply.json()["error"])


def test_oversized_requests_are_refused(local_server, examples):
    big = {"instances": [_b64(b"x" * 1000)] * 400}  # ~540 KB > the fixture's 256 KiB limit
    reply = _post(local_server, big)
    assert reply.status_code == 400 and "exceeds this server's limit of 262144 bytes" in reply.json()["error"]
    chunked = requests.post(f"http://{local_server.rest}/v1/models/mdmt:predict", timeout=30,
                            data=(b'{"instances": [' + b'"x",' * 100_000 for _ in range(1)))
    assert chunked.status_code == 400 and "exceeds" in chunked.json()["error"]
    with pytest.raises(grpc.RpcError) as info:
        _grpc_predict(local_server, {"examples": tf.make_tensor_proto([b"x" * 1000] * 400)})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds" in info.value.details()
    assert _post(local_server, {"instances": [_b64(e) for e in examples[:3]]}).status_code == 200


def test_head_is_not_a_server_error(local_server):
    assert requests.head(f"http://{local_server.rest}/v1/models/mdmt", timeout=10).status_code == 400


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/models/mdmt/versions/x", 400),      # not a number: malformed
    ("PUT", "/v1/models/mdmt:predict", 400),
    ("GET", "/v1/models/mdmt:predict", 400),
    ("POST", "/v1/models/mdmt", 400),
    ("GET", "/v1/models", 400),                       # no model name
    ("POST", "/v1/models/mdmt:classify", 501),
    ("GET", "/metrics", 404),
    ("GET", "/v1/models/other/versions/1", 404),
])
def test_routes(local_server, method, path, status):
    reply = requests.request(method, f"http://{local_server.rest}{path}", data=b"{}", timeout=10)
    assert reply.status_code == status, reply.text
    assert "error" in reply.json()
