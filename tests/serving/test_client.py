"""The client's error surfacing and retries, against scripted fake servers (no model)."""
from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from mdmt_tf.errors import ConfigError, MdmtError
from serving.client import ServingClient
from serving.errors import ServingError
from tests.serving.conftest import FakeHandler, LoopbackHttp, free_port

STATUS_OK = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                       "status": {"error_code": "OK", "error_message": ""}}]}


class ScriptedHttp:
    """Answers GETs with the next (status, body) of `script`, then 200 STATUS_OK; counts calls."""

    def __init__(self, script):
        self.script, self.calls = list(script), 0
        owner = self

        class Handler(FakeHandler):
            def do_GET(self):
                owner.calls += 1
                status, body = owner.script.pop(0) if owner.script else (200, STATUS_OK)
                self.send_body(status, body if isinstance(body, bytes) else json.dumps(body).encode())

        self.http = LoopbackHttp(Handler)
        self.target = self.http.target

    def close(self):
        self.http.close()


@pytest.fixture()
def http():
    servers = []

    def make(script):
        servers.append(ScriptedHttp(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_rest_retries_unavailable_then_succeeds(http):
    fake = http([(503, {"error": "warming up"}), (503, {"error": "warming up"})])
    with ServingClient(fake.target, retries=2, backoff=0.01) as client:
        assert client.status() == STATUS_OK
    assert fake.calls == 3


def test_rest_gives_up_after_retries_with_the_servers_message(http):
    fake = http([(503, {"error": "overloaded"})] * 5)
    with ServingClient(fake.target, retries=2, backoff=0.01) as client:
        with pytest.raises(ServingError) as info:
            client.status()
    err = info.value
    assert (err.protocol, err.code, err.message, err.attempts) == ("rest", 503, "overloaded", 3)
    assert fake.calls == 3 and "after 3 attempts" in str(err) and isinstance(err, MdmtError)


@pytest.mark.parametrize("status", [400, 404, 500])
def test_rest_client_errors_are_not_retried(http, status):
    fake = http([(status, {"error": f"Could not find version 9 of model mdmt ({status})"})])
    with ServingClient(fake.target, retries=3, backoff=0.01) as client:
        with pytest.raises(ServingError) as info:
            client.status()
    assert info.value.code == status and "Could not find version 9" in info.value.message
    assert fake.calls == 1 and not info.value.retryable


def test_rest_non_json_error_body(http):
    fake = http([(502, b"<html>Bad Gateway</html>")] * 3)
    with ServingClient(fake.target, retries=1, backoff=0.01) as client:
        with pytest.raises(ServingError, match="Bad Gateway") as info:
            client.status()
    assert info.value.code == 502 and fake.calls == 2


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_unreachable_server_is_unavailable_after_retries(protocol):
    with ServingClient(f"127.0.0.1:{free_port()}", protocol=protocol, retries=1, backoff=0.01, timeout=2) as client:
        with pytest.raises(ServingError) as info:
            client.status()
    assert info.value.code == "UNAVAILABLE" and info.value.attempts == 2


class ScriptedModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, failures):
        self.failures, self.calls = list(failures), 0

    def GetModelStatus(self, request, context):
        self.calls += 1
        if self.failures:
            code, message = self.failures.pop(0)
            context.abort(code, message)
        response = get_model_status_pb2.GetModelStatusResponse()
        entry = response.model_version_status.add(version=1, state=30)
        entry.status.SetInParent()
        return response


@pytest.fixture()
def grpc_fake():
    servers = []

    def make(failures):
        service = ScriptedModelService(failures)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return service, f"127.0.0.1:{port}"

    yield make
    for server in servers:
        server.stop(0)


def test_grpc_retries_unavailable_only(grpc_fake):
    service, target = grpc_fake([(grpc.StatusCode.UNAVAILABLE, "loading")])
    with ServingClient(target, protocol="grpc", retries=2, backoff=0.01) as client:
        assert client.status() == STATUS_OK
    assert service.calls == 2

    service, target = grpc_fake([(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")] * 3)
    with ServingClient(target, protocol="grpc", retries=2, backoff=0.01) as client:
        with pytest.raises(ServingError) as info:
            client.status()
    assert (info.value.code, info.value.message, service.calls) == ("INVALID_ARGUMENT", "Missing ModelSpec", 1)


@pytest.mark.parametrize("kwargs,match", [({"protocol": "http"}, "protocol"), ({"version": 1, "version_label": "a"},
                                                                               "not both"),
                                          ({"rest_format": "rows"}, "rest_format"), ({"timeout": 0}, "timeout")])
def test_bad_client_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ServingClient("localhost:8501", **kwargs)
