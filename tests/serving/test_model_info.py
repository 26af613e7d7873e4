"""The `model_info` signature: exported with every model, called through ordinary Predict
(REST and gRPC), read into a ModelInfo by the client and used by `mdmt predict --server`.
Parametrised over the server fixtures, so it also runs against tensorflow_model_server
where the binary is installed. A model exported before the signature existed gets a
clear error (never a probe request and a regex over TF's error text)."""
from __future__ import annotations

import shutil

import pytest
import requests

from tests.serving.conftest import SERVERS, start_server


def _expected(serving_data) -> dict:
    spec = serving_data.spec
    return {"domain": spec.domain, "domains": tuple(serving_data.vocab.domains), "tasks": tuple(spec.tasks),
            "features": {**{n: "string" for n in (spec.domain, *spec.sparse)}, **{n: "float32" for n in spec.dense}},
            "sparse": tuple(spec.sparse), "dense": tuple(spec.dense)}


def _check(info, want: dict) -> None:
    from serving import ModelInfo

    assert isinstance(info, ModelInfo)
    assert (info.domain, info.domains, info.tasks) == (want["domain"], want["domains"], want["tasks"])
    assert info.features == want["features"] and list(info.features) == list(want["features"])  # predict_raw order
    assert (info.sparse, info.dense) == (want["sparse"], want["dense"])
    assert info.kinds[want["domain"]] == "domain"


def test_the_savedmodel_answers_model_info_in_process(models, serving_data):
    import tensorflow as tf

    signature = tf.saved_model.load(str(models[1])).signatures["model_info"]
    out = {k: v.numpy() for k, v in signature(request=tf.constant(0)).items()}
    want = _expected(serving_data)
    assert out["domain"] == want["domain"].encode() and int(out["info_version"]) == 1
    assert [d.decode() for d in out["domains"]] == list(want["domains"])
    assert [t.decode() for t in out["tasks"]] == list(want["tasks"])
    assert [n.decode() for n in out["feature_names"]] == list(want["features"])
    assert [d.decode() for d in out["feature_dtypes"]] == list(want["features"].values())


@pytest.mark.parametrize("protocol,rest_format", [("rest", "columnar"), ("rest", "row"), ("grpc", "columnar")])
def test_model_info_round_trips_through_the_client(server, serving_data, protocol, rest_format):
    with server.client(protocol, rest_format=rest_format) as client:
        _check(client.model_info(), _expected(serving_data))


def test_model_info_is_an_ordinary_rest_predict(server, serving_data):
    """What any REST client sends: the columnar format with the one (ignored) input."""
    reply = requests.post(f"http://{server.rest}/v1/models/mdmt:predict", timeout=30,
                          json={"signature_name": "model_info", "inputs": {"request": 0}})
    assert reply.status_code == 200, reply.text
    outputs = reply.json()["outputs"]
    want = _expected(serving_data)
    assert outputs["domain"] == want["domain"] and outputs["domains"] == list(want["domains"])
    assert outputs["tasks"] == list(want["tasks"]) and outputs["info_version"] == 1


def strip_model_info(model_dir, out):
    """A copy of `model_dir` as exported before the model_info signature existed."""
    from tensorflow.core.protobuf import saved_model_pb2

    shutil.copytree(model_dir, out)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((out / "saved_model.pb").read_bytes())
    for graph in proto.meta_graphs:
        del graph.signature_def["model_info"]
    (out / "saved_model.pb").write_bytes(proto.SerializeToString())
    (out / "fingerprint.pb").unlink(missing_ok=True)  # its checksum covered the old saved_model.pb
    return out


@pytest.fixture(scope="module", params=SERVERS)
def old_model_server(request, models, tmp_path_factory):
    from mdmt_tf.export.savedmodel import publish_version

    root = tmp_path_factory.mktemp(f"old-model-{request.param}")
    publish_version(strip_model_info(models[1], root / "old"), root / "mdmt")
    process = start_server(request.param, root / "mdmt", root / "server.log")
    yield process
    process.stop()


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_model_without_model_info_gets_a_clear_error(old_model_server, protocol):
    from serving import ModelInfoUnavailable

    with old_model_server.client(protocol) as client:
        assert "model_info" not in client.metadata()["metadata"]["signature_def"]["signature_def"]
        with pytest.raises(ModelInfoUnavailable, match="has no 'model_info' signature") as info:
            client.model_info()
        assert "--spec" in str(info.value)
        assert set(client.predict_raw({"domain_id": ["0"], "user_id": ["u"], "item_id": ["i"], "gender": ["F"],
                                       "occupation": ["o"], "zip": ["z"], "cate_id": ["c"], "age": [0.3]})) \
            == {"click", "like"}  # the model itself serves as before


def test_mdmt_predict_server_on_a_model_without_model_info(old_model_server, rows, serving_data, tmp_path, capsys):
    from mdmt_tf.data.readers import write_csv
    from tests.serving.test_cli import run

    data = tmp_path / "score.csv"
    write_csv(rows.drop(columns=list(serving_data.spec.tasks)), data)
    code, _, err = run(["predict", "--server", old_model_server.rest, "--data", str(data),
                        "--out", str(tmp_path / "p.csv")], capsys)
    assert code == 2 and err.startswith("mdmt: error:") and "model_info" in err and "--spec" in err
    assert err.count("\n") == 1
    spec = tmp_path / "spec.yaml"
    serving_data.spec.to_yaml(spec)
    code, text, err = run(["predict", "--server", old_model_server.rest, "--spec", str(spec), "--data", str(data),
                           "--out", str(tmp_path / "p.csv")], capsys)
    assert code == 0 and f"scored {len(rows)} rows" in text, err
