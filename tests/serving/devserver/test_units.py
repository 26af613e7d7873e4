"""Pieces of the dev server without a model: the version repository, the JSON codec,
TF error cleaning and status mapping."""
from __future__ import annotations

import numpy as np
import pytest
from tensorflow.core.framework import types_pb2

from serving import codec
from serving.devserver import rest_codec
from serving.devserver.repository import ModelRepository
from serving.devserver.servable import clean_tf_message
from serving.devserver.signatures import SignatureInfo, TensorInfo, check_inputs
from serving.devserver.status import HTTP_STATUS, StatusError


class FakeServable:
    def __init__(self, name, version, path):
        self.name, self.version, self.path = name, version, path


def _repository(tmp_path, versions, failing=(), loads=None, **kwargs):
    """A repository over empty version directories; `failing`: versions whose load raises
    (a set the test may change); `loads`: a list that records every load attempt."""
    for v in versions:
        (tmp_path / str(v)).mkdir()

    def load(name, version, path):
        if loads is not None:
            loads.append(version)
        if version in failing:
            raise RuntimeError(f"cannot load {path}")
        return FakeServable(name, version, path)

    return ModelRepository("mdmt", tmp_path, load, **kwargs)


def _states(repo):
    return {s.version: (s.state, s.status.error_message) for s in repo.status("mdmt").model_version_status}


def test_repository_serves_the_newest_and_switches(tmp_path):
    repo = _repository(tmp_path, [1, 2])
    repo.poll()
    assert repo.servable("mdmt").version == 2 and repo.available_versions() == [2]
    (tmp_path / "3").mkdir()
    (tmp_path / ".4.tmp-1").mkdir()  # a half-published version is invisible
    repo.poll()
    assert repo.servable("mdmt").version == 3
    assert _states(repo) == {3: (30, ""), 2: (50, "")}  # AVAILABLE, END (unloaded)
    with pytest.raises(StatusError, match=r"Servable not found for request: Specific\(mdmt, 2\)"):
        repo.servable("mdmt", version=2)


def test_repository_keeps_serving_when_a_load_fails_and_retries_it(tmp_path):
    failing, loads = {2}, []
    repo = _repository(tmp_path, [1], failing=failing, loads=loads, load_retry_seconds=0)
    repo.poll()
    (tmp_path / "2").mkdir()
    repo.poll()
    assert repo.servable("mdmt").version == 1 and repo.available_versions() == [1]
    state, error = _states(repo)[2]
    assert state == 50 and "cannot load" in error
    failing.clear()  # e.g. the copy was completed, or a missing op became available
    repo.poll()  # a failed version is retried on a later poll
    assert repo.servable("mdmt").version == 2 and repo.available_versions() == [2]
    assert _states(repo)[2] == (30, "") and loads == [1, 2, 2]


def test_failed_loads_are_retried_a_bounded_number_of_times_apart(tmp_path):
    loads = []
    repo = _repository(tmp_path, [1], failing={2}, loads=loads, max_load_retries=2, load_retry_seconds=3600)
    repo.poll()
    (tmp_path / "2").mkdir()
    repo.poll()
    assert loads == [1, 2] and repo.available_versions() == [1]  # v2 failed; v1 serves
    repo.poll()
    assert loads == [1, 2], "not retried before load_retry_seconds"
    repo.load_retry_seconds = 0
    for _ in range(5):
        repo.poll()
    assert loads == [1, 2, 2, 2], "one load and max_load_retries=2 retries, then no more"
    assert repo.available_versions() == [1] and _states(repo)[2][0] == 50


def test_deleting_the_newest_version_rolls_back(tmp_path):
    """TF Serving's `latest` policy: the newest version left on disk is served; the
    deleted one is unloaded once the older one is AVAILABLE (loaded again: it was unloaded)."""
    import shutil

    loads = []
    repo = _repository(tmp_path, [1, 2], loads=loads)
    repo.poll()
    assert repo.available_versions() == [2] and loads == [2]
    shutil.rmtree(tmp_path / "2")
    repo.poll()
    assert repo.servable("mdmt").version == 1 and repo.available_versions() == [1] and loads == [2, 1]
    assert _states(repo) == {1: (30, ""), 2: (50, "")}
    (tmp_path / "2").mkdir()  # republished: served again
    repo.poll()
    assert repo.available_versions() == [2] and loads == [2, 1, 2]


def test_rollback_with_latest_n_and_when_nothing_else_loads(tmp_path):
    import shutil

    repo = _repository(tmp_path, [1, 2, 3], num_versions=2, failing={1}, load_retry_seconds=0)
    repo.poll()
    assert repo.available_versions() == [2, 3]
    shutil.rmtree(tmp_path / "3")
    repo.poll()  # wants [1, 2]; 1 fails, 2 stays; the deleted 3 goes
    assert repo.available_versions() == [2]
    shutil.rmtree(tmp_path / "2")
    repo.poll()  # nothing on disk loads: the newest loaded version keeps serving
    assert repo.available_versions() == [2] and repo.servable("mdmt").version == 2


def test_repository_latest_n_and_labels(tmp_path):
    repo = _repository(tmp_path, [1, 2, 3], num_versions=2, labels={"stable": 2, "old": 1})
    repo.poll()
    assert repo.available_versions() == [2, 3]
    assert repo.servable("mdmt", label="stable").version == 2
    with pytest.raises(StatusError, match="Unrecognized servable version label: nope") as info:
        repo.servable("mdmt", label="nope")
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(StatusError, match=r"Specific\(mdmt, 1\)") as info:
        repo.servable("mdmt", label="old")
    assert info.value.code == "NOT_FOUND"
    with pytest.raises(StatusError, match="cannot be supplied"):
        repo.servable("mdmt", version=2, label="stable")
    with pytest.raises(StatusError, match=r"Latest\(other\)"):
        repo.servable("other")
    with pytest.raises(StatusError, match="Could not find any versions of model other"):
        repo.status("other")
    with pytest.raises(StatusError, match="Could not find version 9 of model mdmt"):
        repo.status("mdmt", 9)


def test_empty_base_path_is_not_found_until_a_version_appears(tmp_path):
    repo = _repository(tmp_path, [])
    repo.poll()
    with pytest.raises(StatusError, match=r"Latest\(mdmt\)"):
        repo.servable("mdmt")
    (tmp_path / "1").mkdir()
    repo.poll()
    assert repo.servable("mdmt").version == 1


SIG = SignatureInfo("predict_raw", {"id": TensorInfo("id", types_pb2.DT_STRING, (-1,)),
                                    "age": TensorInfo("age", types_pb2.DT_FLOAT, (-1,))}, {})


def test_codec_columnar_and_rows():
    call = rest_codec.parse_predict({"inputs": {"id": ["a", {"b64": "Yg=="}], "age": [1, 2.5], "extra": 1}}, SIG)
    assert not call.row_format and call.inputs["id"].tolist() == [b"a", b"b"]
    assert call.inputs["age"].dtype == np.float32 and call.inputs["age"].tolist() == [1.0, 2.5]
    call = rest_codec.parse_predict({"instances": [{"id": "a", "age": float("nan")}]}, SIG)
    assert call.row_format and np.isnan(call.inputs["age"][0])


@pytest.mark.parametrize("doc,words", [
    ({"inputs": {"id": ["a"], "age": [True]}}, ["age", "Type: True"]),
    ({"inputs": {"id": ["a"], "age": [16777217]}}, ["age", "loss of precision"]),
    ({"inputs": {"id": [None], "age": [1.0]}}, ["id", "Null"]),
    ({"inputs": {"id": [{"b64": "x", "y": 1}], "age": [1.0]}}, ["id", "base64"]),
    ({"inputs": {"id": [["a"]], "age": [1.0]}}, []),  # rank 2 passes the codec; check_inputs refuses it
    ({"inputs": {"id": [[[[]]]] * 2, "age": [1.0]}}, ["id"]),
    ({"instances": [{"id": "a", "age": 1.0}, ["a", 1.0]]}, ["item 1"]),
    ({"instances": [{"id": "a"}]}, ["missing: ['age']"]),
])
def test_codec_errors_name_the_input(doc, words):
    try:
        call = rest_codec.parse_predict(doc, SIG)
    except StatusError as err:
        assert err.code == "INVALID_ARGUMENT" and words, err.message
        for word in words:
            assert word in err.message
        return
    with pytest.raises(StatusError, match="id.*shape"):
        check_inputs(SIG, call.inputs)


def test_codec_refuses_deep_nesting():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(StatusError, match="JSON Parse error"):
        rest_codec.parse_json(f'{{"inputs": {deep}}}'.encode())
    with pytest.raises(StatusError, match="nested more than"):
        rest_codec.to_array([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["a"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
                            TensorInfo("x", types_pb2.DT_STRING, None))


def test_response_formats():
    outputs = {"click": np.array([0.1, 0.25], np.float32), "like": np.array([0.5, 1 / 3], np.float32)}
    rows = rest_codec.predict_response(outputs, row_format=True)
    assert rows == {"predictions": [{"click": 0.1, "like": 0.5}, {"click": 0.25, "like": 0.33333334}]}
    columns = rest_codec.predict_response(outputs, row_format=False)
    assert columns == {"outputs": {"click": [0.1, 0.25], "like": [0.5, 0.33333334]}}
    single = rest_codec.predict_response({"click": outputs["click"]}, row_format=True)
    assert single == {"predictions": [0.1, 0.25]}
    for doc in (rows, columns):  # float32 values survive the shortest-form round trip exactly
        decoded = codec.decode_outputs(doc, ["click", "like"])
        assert all(np.array_equal(decoded[k], outputs[k]) for k in outputs)


def test_clean_tf_message():
    raw = ("Graph execution error:\n\nDetected at node x defined at (most recent call last):\n<stack traces "
           "unavailable>\nassertion failed: [unknown value of domain column \\'d\\'; known values: [\\'0\\'].  ] "
           "[Condition x >= 0 did not hold element-wise:] [x (sub:0) = ] [-1]\n\t [[{{node x}}]] [Op:__inference_1]")
    assert clean_tf_message(raw) == "unknown value of domain column 'd'; known values: ['0']."


def test_status_codes_follow_tf_serving():
    assert StatusError("INVALID_ARGUMENT", "x").http_status == 400
    assert StatusError("FAILED_PRECONDITION", "x").http_status == 400
    assert StatusError("NOT_FOUND", "x").grpc_code.name == "NOT_FOUND"
    assert HTTP_STATUS["UNAVAILABLE"] == 503 and HTTP_STATUS["UNIMPLEMENTED"] == 501
    with pytest.raises(ValueError, match="unknown status code"):
        StatusError("OOPS", "x")
