"""End to end: train -> publish -> serve -> call over REST and gRPC with the real client;
predictions equal the SavedModel's own signatures; a new version is served without restart."""
from __future__ import annotations

import numpy as np
import pytest

from tests.serving.conftest import SERVERS, in_process, start_server

pytestmark = pytest.mark.slow

CLIENTS = [("rest", "columnar"), ("rest", "row"), ("grpc", "columnar")]


def assert_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for task in want:
        assert got[task].shape == want[task].shape
        np.testing.assert_allclose(got[task], want[task], rtol=0, atol=1e-6, err_msg=task)


@pytest.mark.parametrize("protocol,rest_format", CLIENTS)
def test_predictions_equal_in_process_signatures(server, models, examples, raw, protocol, rest_format):
    import tensorflow as tf

    want = in_process(models[1], examples)
    loaded = tf.saved_model.load(str(models[1]))
    want_raw = {k: v.numpy() for k, v in loaded.signatures["predict_raw"](
        **{k: tf.constant(v) for k, v in raw.items()}).items()}
    with server.client(protocol, rest_format=rest_format) as client:
        assert_close(client.predict_examples(examples), want)
        assert_close(client.predict_raw(raw), want_raw)
        assert_close(client.predict_examples(examples[:1]), {k: v[:1] for k, v in want.items()})
    assert_close(want_raw, want)  # the two signatures agree, unseen ids (row 3) included


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_unseen_ids_use_the_oov_bucket(server, raw, protocol):
    """A row whose ids were never seen scores like the same row with empty (OOV) ids."""
    row = {k: v[3:4] for k, v in raw.items()}
    empty = {**row, "user_id": np.array([""]), "item_id": np.array([""])}
    with server.client(protocol) as client:
        got, oov = client.predict_raw(row), client.predict_raw(empty)
    for task in got:
        assert np.isfinite(got[task]).all() and 0 <= got[task][0] <= 1
        np.testing.assert_allclose(got[task], oov[task], atol=1e-6)


@pytest.mark.parametrize("kind", SERVERS)
def test_new_version_is_served_without_restart(kind, models, examples, tmp_path):
    from mdmt_tf.export.savedmodel import publish_version

    base = tmp_path / "mdmt"
    publish_version(models[1], base)
    process = start_server(kind, base, tmp_path / "server.log")
    try:
        v1, v2 = in_process(models[1], examples), in_process(models[2], examples)
        assert not np.allclose(v1["click"], v2["click"], atol=1e-4)  # the versions really differ
        rest, grpc = process.client("rest"), process.client("grpc")
        assert_close(rest.predict_examples(examples), v1)
        pid = process.process.pid

        publish_version(models[2], base)
        process.wait_for_version(2)
        assert process.alive() and process.process.pid == pid
        assert_close(rest.predict_examples(examples), v2)
        assert_close(grpc.predict_examples(examples), v2)
        meta = grpc.metadata()
        assert meta["model_spec"]["version"] == "2"
        states = {v["version"]: v["state"] for v in rest.status()["model_version_status"]}
        assert states["2"] == "AVAILABLE" and states.get("1") in (None, "END")  # latest-1 policy unloads v1
        rest.close(), grpc.close()
    finally:
        process.stop()


def test_versions_and_labels_are_addressable(models, examples, tmp_path):
    """--num-versions 2 keeps both loaded; /versions/N and /labels/L pick one."""
    from mdmt_tf.export.savedmodel import publish_version
    from tests.serving.conftest import ServerProcess

    base = tmp_path / "mdmt"
    publish_version(models[1], base)
    publish_version(models[2], base)
    process = ServerProcess("local", base, tmp_path / "server.log",
                            extra=["--num-versions", "2", "--version-label", "stable=1",
                                   "--version-label", "canary=2"])
    try:
        process.wait_for_version(1)
        process.wait_for_version(2)
        v1, v2 = in_process(models[1], examples), in_process(models[2], examples)
        for protocol in ("rest", "grpc"):
            with process.client(protocol) as latest, process.client(protocol, version=1) as first, \
                    process.client(protocol, version_label="stable") as stable, \
                    process.client(protocol, version_label="canary") as canary:
                assert_close(latest.predict_examples(examples), v2)
                assert_close(first.predict_examples(examples), v1)
                assert_close(stable.predict_examples(examples), v1)
                assert_close(canary.predict_examples(examples), v2)
    finally:
        process.stop()


def _serving_version(process, examples, versions: dict, timeout: float = 60.0) -> int:
    """Poll until the server's answers equal `versions`'s one entry ({number: in-process
    outputs}); returns that number."""
    import time

    (number, want), = versions.items()
    deadline = time.monotonic() + timeout
    with process.client("rest", retries=0) as client:
        while True:
            got = client.predict_examples(examples)
            if all(np.allclose(got[t], want[t], atol=1e-6) for t in want):
                return number
            if time.monotonic() > deadline:
                raise AssertionError(f"still not serving version {number}: {process.output()}")
            time.sleep(0.2)


@pytest.mark.parametrize("kind", SERVERS)
def test_deleting_the_newest_version_rolls_back(kind, models, examples, tmp_path):
    """TF Serving's `latest` policy: with version 2 deleted, version 1 is served again."""
    import shutil

    from mdmt_tf.export.savedmodel import publish_version

    base = tmp_path / "mdmt"
    publish_version(models[1], base)
    publish_version(models[2], base)
    process = start_server(kind, base, tmp_path / "server.log")
    try:
        v1, v2 = in_process(models[1], examples), in_process(models[2], examples)
        assert _serving_version(process, examples, {2: v2}) == 2
        shutil.rmtree(base / "2")
        assert _serving_version(process, examples, {1: v1}) == 1
        process.wait_for_version(1)
        publish_version(models[2], base)  # published again (as version 2: the next free number)
        assert _serving_version(process, examples, {2: v2}) == 2
    finally:
        process.stop()


def test_a_version_that_failed_to_load_is_retried(models, examples, tmp_path):
    """A version whose first load fails (here: copied in place, not yet complete) is loaded
    on a later try; meanwhile the previous version serves."""
    import shutil
    import time

    from mdmt_tf.export.savedmodel import publish_version
    from tests.serving.conftest import ServerProcess

    base = tmp_path / "mdmt"
    publish_version(models[1], base)
    process = ServerProcess("local", base, tmp_path / "server.log", extra=["--load-retry-seconds", "1"])
    try:
        (base / "2").mkdir()
        (base / "2" / "saved_model.pb").write_bytes(b"half a file")
        deadline = time.monotonic() + 60
        with process.client("rest") as client:
            while True:
                states = {v["version"]: v for v in client.status()["model_version_status"]}
                if "2" in states and states["2"]["status"]["error_message"]:
                    break
                assert time.monotonic() < deadline, process.output()
                time.sleep(0.2)
            assert states["2"]["state"] == "END" and states["1"]["state"] == "AVAILABLE"
            assert_close(client.predict_examples(examples), in_process(models[1], examples))
        shutil.copytree(models[2], base / "2", dirs_exist_ok=True)  # the copy completes
        assert _serving_version(process, examples, {2: in_process(models[2], examples)}) == 2
    finally:
        process.stop()
