"""Hypothesis fuzz of JSON bodies against the dev server's REST API: whatever the body,
the answer is 200 or a documented 4xx with an {"error": ...} body, never a 5xx, and
the server stays up. Bodies range from arbitrary JSON to near-valid predict requests
with one field of a random type or shape."""
from __future__ import annotations

import json
import os
import tempfile

# keep hypothesis' cache out of the checkout (it would write .hypothesis/ in the cwd)
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "mdmt-hypothesis"))

import pytest  # noqa: E402
import requests  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.slow

FEATURES = {"domain_id": "s", "user_id": "s", "item_id": "s", "gender": "s", "occupation": "s", "zip": "s",
            "cate_id": "s", "age": "f"}
SIGNATURES = st.sampled_from(["serving_default", "predict_raw", "", "nope"])
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["b64", "inputs", "instances", "age", "user_id", "x"]) | st.text(max_size=4), inner,
    max_size=4), max_leaves=12)
B64 = st.builds(lambda s: {"b64": s}, st.text(alphabet="ABCDabcd0123+/=_-", max_size=12))


def _value(kind: str):
    good = st.text(max_size=6) if kind == "s" else st.floats(-1e6, 1e6)
    return good | JSON | B64


@st.composite
def near_valid_raw(draw):
    n = draw(st.integers(0, 3))
    columns = {name: draw(st.lists(_value(kind), min_size=n, max_size=n) | JSON)
               for name, kind in FEATURES.items() if draw(st.integers(0, 9)) > 0}
    if draw(st.booleans()):
        return {"signature_name": draw(SIGNATURES), "inputs": columns}
    rows = [{k: (v[i] if isinstance(v, list) and i < len(v) else v) for k, v in columns.items()} for i in range(n)]
    return {"signature_name": draw(SIGNATURES), "instances": rows}


@st.composite
def near_valid_examples(draw):
    values = draw(st.lists(B64 | JSON, max_size=3))
    key = draw(st.sampled_from(["instances", "inputs"]))
    return {key: values if key == "instances" else draw(st.sampled_from([values, {"examples": values}]))}


BODIES = JSON | near_valid_raw() | near_valid_examples() | st.dictionaries(
    st.sampled_from(["signature_name", "inputs", "instances"]), JSON, max_size=3)
PATHS = st.sampled_from(["mdmt:predict", "mdmt/versions/1:predict", "mdmt/labels/stable:predict",
                         "mdmt/versions/99999999999999999999:predict", "m%20x:predict", "mdmt/labels/%ZZ:predict"])
ALLOWED = {200, 400, 404}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(body=BODIES, path=PATHS)
def test_json_bodies_never_cause_a_5xx(local_server, body, path):
    payload = json.dumps(body, allow_nan=True).encode()
    reply = requests.post(f"http://{local_server.rest}/v1/models/{path}", data=payload, timeout=30)
    assert reply.status_code in ALLOWED, (reply.status_code, reply.text, payload[:300])
    doc = reply.json()
    assert ("error" in doc) == (reply.status_code != 200)
    if reply.status_code == 200:
        assert set(doc) <= {"predictions", "outputs"}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(payload=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_raw_bytes_never_cause_a_5xx(local_server, payload):
    reply = requests.post(f"http://{local_server.rest}/v1/models/mdmt:predict", data=payload, timeout=30)
    assert reply.status_code in ALLOWED, (reply.status_code, reply.text)


def test_server_survived_the_fuzz(local_server):
    assert local_server.alive()
    assert requests.get(f"http://{local_server.rest}/v1/models/mdmt", timeout=10).status_code == 200
