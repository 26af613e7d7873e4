"""Status and metadata: TF Serving's REST shapes, the same documents over gRPC."""
from __future__ import annotations

import pytest
import requests


@pytest.mark.parametrize("path", ["/v1/models/mdmt", "/v1/models/mdmt/versions/1", "/v1/models/mdmt/labels/x"])
def test_rest_status(server, path):
    reply = requests.get(f"http://{server.rest}{path}", timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}


@pytest.mark.parametrize("path,message", [("/v1/models/other", "Could not find any versions of model other"),
                                          ("/v1/models/mdmt/versions/5", "Could not find version 5 of model mdmt")])
def test_rest_status_not_found(server, path, message):
    reply = requests.get(f"http://{server.rest}{path}", timeout=10)
    assert reply.status_code == 404 and reply.json() == {"error": message}


def test_rest_metadata(server):
    doc = requests.get(f"http://{server.rest}/v1/models/mdmt/metadata", timeout=10).json()
    assert doc["model_spec"] == {"name": "mdmt", "signature_name": "", "version": "1"}
    signatures = doc["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "predict_raw"} <= set(signatures)
    default = signatures["serving_default"]
    assert default["inputs"]["examples"]["dtype"] == "DT_STRING"
    assert default["inputs"]["examples"]["tensor_shape"]["dim"][0]["size"] == "-1"
    assert set(default["outputs"]) == {"click", "like"}
    assert default["method_name"] == "tensorflow/serving/predict"
    raw = signatures["predict_raw"]["inputs"]
    assert raw["age"]["dtype"] == "DT_FLOAT" and raw["domain_id"]["dtype"] == "DT_STRING"


def test_client_status_and_metadata_agree_across_protocols(server):
    with server.client("rest") as rest, server.client("grpc") as grpc_client:
        assert rest.status() == grpc_client.status()
        rest_meta, grpc_meta = rest.metadata(), grpc_client.metadata()
    assert rest_meta["model_spec"]["version"] == grpc_meta["model_spec"]["version"] == "1"
    assert rest_meta["metadata"] == grpc_meta["metadata"]


def test_grpc_status_errors(server):
    from serving.errors import ServingError

    with server.client("grpc", version=5, retries=0) as client:
        with pytest.raises(ServingError) as info:
            client.status()
    assert info.value.code == "NOT_FOUND" and "Could not find version 5 of model mdmt" in info.value.message


def test_served_spec_comes_from_model_info(server, serving_data):
    """mdmt predict --server without --spec: the spec comes from the served model's
    model_info signature, tasks and domain values in the model's own order."""
    from serving.scoring import served_spec

    with server.client("rest") as client:
        spec = served_spec(client)
    want = serving_data.spec
    assert spec.domain == want.domain and spec.sparse == want.sparse and spec.dense == want.dense
    assert spec.tasks == want.tasks and spec.domains == tuple(serving_data.vocab.domains)
