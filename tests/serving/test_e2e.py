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
