"""Serving fixtures: two tiny trained SavedModels, request data, and model servers.

A server fixture is parametrised over the dev stand-in (`local`, always) and the real
`tensorflow_model_server` (`tfserving`, only when the binary is on PATH; skipped
otherwise), so the end-to-end tests check the stand-in against the same expectations
the real server meets. Servers run as subprocesses on free loopback ports.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = ("mmoe", {"expert_units": [16, 8], "tower_units": [8], "embedding_dim": 4})
SERVERS = ["local", "tfserving"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeHandler(BaseHTTPRequestHandler):
    """Base of the fake servers' request handlers: silent, with one way to answer."""

    def send_body(self, status: int, payload: bytes, content_type: str | None = None):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class LoopbackHttp:
    """A threaded HTTP server for a fake's request handler on a free loopback port;
    `target` is host:port, `close()` stops it."""

    def __init__(self, handler):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.target = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _train(data, out: Path, seed: int) -> Path:
    from mdmt_tf.models import ModelConfig
    from mdmt_tf.training.fit import TrainConfig, train

    train(ModelConfig(*TINY_MODEL), data, TrainConfig(epochs=1, batch_size=256, seed=seed), out, plots=False,
          verbose=0)
    return out / "model"


@pytest.fixture(scope="session")
def serving_data(small_data):
    return small_data


@pytest.fixture(scope="session")
def models(serving_data, tmp_path_factory) -> dict[int, Path]:
    """Two SavedModels of the same spec with different weights: {1: dir, 2: dir}."""
    root = tmp_path_factory.mktemp("models")
    return {1: _train(serving_data, root / "v1", seed=0), 2: _train(serving_data, root / "v2", seed=1)}


@pytest.fixture(scope="session")
def rows(serving_data):
    """40 test rows to score; row 3 has a user and item never seen in training (OOV)."""
    table = serving_data.splits.test.head(40).reset_index(drop=True).copy()
    table.loc[3, "user_id"] = "never-seen-user"
    table.loc[3, "item_id"] = "never-seen-item"
    return table


@pytest.fixture(scope="session")
def examples(rows, serving_data) -> list[bytes]:
    from mdmt_tf.data.readers import example_bytes

    return example_bytes(rows, serving_data.spec, with_labels=False)


@pytest.fixture(scope="session")
def raw(rows, serving_data) -> dict[str, np.ndarray]:
    from mdmt_tf.data.dataset import raw_feature_arrays

    return raw_feature_arrays(rows, serving_data.spec)


def in_process(model_dir: Path, examples: list[bytes]) -> dict[str, np.ndarray]:
    """The reference: the SavedModel's serving_default called in this process."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    return {k: v.numpy() for k, v in signature(examples=tf.constant(examples)).items()}


class ServerProcess:
    """A model server subprocess on free ports; `rest` / `grpc` are its addresses."""

    def __init__(self, kind: str, base_path: Path, log: Path, extra: list[str] = (), name: str = "mdmt"):
        self.kind, self.base_path, self.name = kind, base_path, name
        self.rest_port, self.grpc_port = free_port(), free_port()
        if kind == "local":
            command = [sys.executable, "-m", "serving.devserver", "--model-base-path", str(base_path),
                       "--model-name", name, "--rest-port", str(self.rest_port), "--grpc-port", str(self.grpc_port),
                       "--poll-seconds", "0.5", *extra]
        else:
            command = ["tensorflow_model_server", f"--port={self.grpc_port}", f"--rest_api_port={self.rest_port}",
                       f"--model_name={name}", f"--model_base_path={base_path}",
                       "--file_system_poll_wait_seconds=1", *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.log = log
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        self.wait_ready()

    @property
    def rest(self) -> str:
        return f"127.0.0.1:{self.rest_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def client(self, protocol: str = "rest", **kwargs):
        from serving.client import ServingClient

        return ServingClient(self.rest if protocol == "rest" else self.grpc, model_name=self.name,
                             protocol=protocol, **kwargs)

    def wait_ready(self, timeout: float = 90.0) -> None:
        from serving.errors import ServingError

        deadline = time.monotonic() + timeout
        with self.client("rest", timeout=2, retries=0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.kind} server exited ({self.process.returncode}): {self.output()}")
                try:
                    client.wait_until_available(timeout=1)
                    return
                except ServingError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.kind} server not ready after {timeout} s: {self.output()}") from None

    def wait_for_version(self, version: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client("rest", timeout=2, retries=0) as client:
            while time.monotonic() < deadline:
                states = {int(v["version"]): v["state"] for v in client.status()["model_version_status"]}
                if states.get(version) == "AVAILABLE":
                    return
                time.sleep(0.2)
        raise RuntimeError(f"version {version} never became AVAILABLE: {self.output()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_bytes().decode(errors="replace")[-3000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def skip_without_binary(kind: str) -> None:
    if kind == "tfserving" and shutil.which("tensorflow_model_server") is None:
        pytest.skip("tensorflow_model_server is not on PATH (the dev stand-in is tested instead)")


def start_server(kind: str, base_path: Path, log: Path, extra: list[str] = ()) -> ServerProcess:
    skip_without_binary(kind)
    return ServerProcess(kind, base_path, log, extra)


@pytest.fixture(scope="session", params=SERVERS)
def server(request, models, tmp_path_factory):
    """A long-lived server with version 1 published, for tests that do not change it."""
    from mdmt_tf.export.savedmodel import publish_version

    skip_without_binary(request.param)
    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    publish_version(models[1], root / "mdmt")
    process = start_server(request.param, root / "mdmt", root / "server.log")
    yield process
    process.stop()


LOCAL_MAX_ROWS, LOCAL_BATCH_ROWS = 100, 16  # the local_server fixture's --max-request-rows, --score-batch-rows


@pytest.fixture(scope="session")
def local_server(models, tmp_path_factory):
    """The dev server with version 1 and small request caps, for its own behaviour."""
    from mdmt_tf.export.savedmodel import publish_version

    root = tmp_path_factory.mktemp("serve-local")
    publish_version(models[1], root / "mdmt")
    process = ServerProcess("local", root / "mdmt", root / "server.log",
                            extra=["--max-request-bytes", str(256 << 10), "--max-request-rows", str(LOCAL_MAX_ROWS),
                                   "--score-batch-rows", str(LOCAL_BATCH_ROWS), "--version-label", "stable=1",
                                   "--version-label", "missing=7"])
    yield process
    process.stop()
