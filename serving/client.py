"""One Python client for TF Serving (or the dev server) over REST or gRPC.

    client = ServingClient("localhost:8501")                       # REST
    client = ServingClient("localhost:8500", protocol="grpc")      # gRPC
    probs = client.predict_examples(serialized_examples)           # {task: np.ndarray}
    probs = client.predict_raw({"domain_id": ["0"], "user_id": ["u7"], ..., "age": [0.3]})
    client.status(); client.metadata()
    info = client.model_info()   # ModelInfo: domain column, domain values, tasks, features

Both protocols return the same thing: outputs as float32 arrays, status and metadata as
the JSON documents TF Serving's REST API returns (gRPC answers are converted to them).
Input dtypes come from the model's metadata (fetched once), so `predict_raw` accepts
plain Python values: ids become strings, numbers float32. `model_info` calls the model's
`model_info` signature through ordinary Predict (mdmt_tf/export/savedmodel.py), so it
works against TF Serving and the stand-in alike; a model exported without that signature
raises ModelInfoUnavailable (a ConfigError saying what to do).

Failures raise ServingError with the HTTP status or gRPC code and the server's own
message. Only failures to reach the server (connection errors, HTTP 502/503/504, gRPC
UNAVAILABLE) are retried, `retries` times with exponential backoff; a 4xx or
INVALID_ARGUMENT would fail the same way again.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Mapping, Sequence
from urllib.parse import quote

import numpy as np

from . import codec
from .errors import ModelInfoUnavailable, ServingError

PROTOCOLS = ("rest", "grpc")
REST_FORMATS = ("columnar", "row")
GRPC_MESSAGE_LIMIT = 256 << 20
MODEL_INFO = "model_info"          # the signature (mdmt_tf.export.savedmodel.MODEL_INFO)
MODEL_INFO_VERSIONS = (1,)         # the info_version values this client reads
FEATURE_KINDS = ("domain", "sparse", "dense")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a served model's `model_info` signature says about it.

    domain: the domain column; domains: its values in the model's order (domain index i is
    domains[i]); tasks: the model's outputs, in the spec's order; features: name -> TF
    dtype name ("string", "float32", "int64"...), in the order of predict_raw's inputs;
    kinds: name -> "domain", "sparse" or "dense".
    """

    domain: str
    domains: tuple[str, ...]
    tasks: tuple[str, ...]
    features: dict[str, str]
    kinds: dict[str, str]

    @property
    def sparse(self) -> tuple[str, ...]:
        return tuple(n for n, k in self.kinds.items() if k == "sparse")

    @property
    def dense(self) -> tuple[str, ...]:
        return tuple(n for n, k in self.kinds.items() if k == "dense")

    @classmethod
    def from_outputs(cls, values: Mapping) -> "ModelInfo":
        """From the signature's outputs: {name: value}, strings as text, bytes or {"b64": ...}."""
        def texts(name):
            value = values[name]
            return [codec.decode_string(v) for v in (value if isinstance(value, (list, tuple)) else [value])]

        version = int(np.asarray(values["info_version"]).reshape(-1)[0])
        if version not in MODEL_INFO_VERSIONS:
            raise ValueError(f"model_info version {version} is newer than this client reads {MODEL_INFO_VERSIONS}; "
                             "update the client")
        names, dtypes, kinds = texts("feature_names"), texts("feature_dtypes"), texts("feature_kinds")
        if not len(names) == len(dtypes) == len(kinds) or not set(kinds) <= set(FEATURE_KINDS):
            raise ValueError(f"inconsistent model_info features: {names}, {dtypes}, {kinds}")
        return cls(domain=texts("domain")[0], domains=tuple(texts("domains")), tasks=tuple(texts("tasks")),
                   features=dict(zip(names, dtypes)), kinds=dict(zip(names, kinds)))


def _json_dict(message) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


class _Rest:
    """TF Serving's REST API with a keep-alive requests.Session."""

    protocol = "rest"

    def __init__(self, target: str, model_path: str, timeout: float, row_format: bool):
        import requests

        base = target if "://" in target else f"http://{target}"
        self.base, self.model_path, self.timeout, self.row_format = base.rstrip("/"), model_path, timeout, row_format
        self.session = requests.Session()

    def _call(self, method: str, suffix: str, body: dict | None = None) -> dict:
        import requests

        url = f"{self.base}/v1/models/{self.model_path}{suffix}"
        data = None if body is None else json.dumps(body, allow_nan=True)  # TF Serving accepts NaN / Infinity
        headers = {"Content-Type": "application/json"} if data is not None else None
        # `timeout` bounds the whole call, like gRPC's deadline: requests' own timeout bounds
        # each wait for data, so the body is streamed and the deadline checked per chunk
        deadline = time.monotonic() + self.timeout
        late = ServingError("rest", "DEADLINE_EXCEEDED", f"no answer within {self.timeout} s", self.base)
        try:
            reply = self.session.request(method, url, data=data, headers=headers, timeout=self.timeout, stream=True)
            chunks = []
            while True:  # read1: whatever has arrived (one socket read), so slow bodies are noticed
                chunk = reply.raw.read1(1 << 16, decode_content=True)
                if not chunk:
                    break
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    reply.close()
                    raise late
            body_bytes = b"".join(chunks)
        except requests.exceptions.ConnectTimeout as err:
            raise ServingError("rest", "UNAVAILABLE", f"cannot connect: {err}", self.base) from None
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as err:
            if isinstance(err, requests.exceptions.Timeout) or time.monotonic() > deadline:
                raise late from None
            raise ServingError("rest", "UNAVAILABLE", f"cannot connect: {err}", self.base) from None
        except requests.exceptions.RequestException as err:
            raise ServingError("rest", "UNAVAILABLE", f"cannot connect: {err}", self.base) from None
        text = body_bytes.decode("utf-8", errors="replace")
        try:
            doc = json.loads(text)
        except ValueError:
            doc = {"error": text[:500] or reply.reason}
        if reply.status_code != 200:
            message = doc.get("error", text[:500]) if isinstance(doc, dict) else text[:500]
            raise ServingError("rest", reply.status_code, str(message), self.base)
        return doc

    def predict(self, signature: str, inputs: dict[str, np.ndarray], dtypes: dict[str, str],
                columnar: bool = False) -> dict:
        """The response document (decoded by the caller, who knows the output names)."""
        columns = {n: codec.encode_column(a, dtypes.get(n) == "DT_STRING") for n, a in inputs.items()}
        if self.row_format and not columnar:
            count = len(next(iter(columns.values()))) if columns else 0
            if len(columns) == 1:  # one-input signature: a plain list of values
                instances = next(iter(columns.values()))
            else:
                instances = [{n: c[i] for n, c in columns.items()} for i in range(count)]
            body = {"signature_name": signature, "instances": instances}
        else:
            body = {"signature_name": signature, "inputs": columns}
        return self._call("POST", ":predict", body)

    def status(self) -> dict:
        return self._call("GET", "")

    def metadata(self) -> dict:
        return self._call("GET", "/metadata")

    def close(self) -> None:
        self.session.close()


class _Grpc:
    """TF Serving's PredictionService / ModelService stubs on one channel."""

    protocol = "grpc"

    def __init__(self, target: str, model_spec: dict, timeout: float):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.target = target.split("://", 1)[-1]
        self.model_spec, self.timeout = model_spec, timeout
        self.channel = grpc.insecure_channel(self.target, options=[
            ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
            ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT)])
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def _rpc(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise ServingError("grpc", err.code().name, err.details() or "", self.target) from None

    def _spec(self, spec, signature: str | None = None) -> None:
        spec.name = self.model_spec["name"]
        if self.model_spec.get("version") is not None:
            spec.version.value = self.model_spec["version"]
        elif self.model_spec.get("label") is not None:
            spec.version_label = self.model_spec["label"]
        if signature is not None:
            spec.signature_name = signature

    def predict(self, signature: str, inputs: dict[str, np.ndarray], dtypes: dict[str, str],
                columnar: bool = False) -> dict:
        """{output: array} (`columnar` is for the REST transport; gRPC has one format)."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature)
        for name, array in inputs.items():
            dtype = tf.string if dtypes.get(name) == "DT_STRING" else None
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array, dtype=dtype))
        response = self._rpc(self.predictions.Predict, request)
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}

    def status(self) -> dict:
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec)
        return _json_dict(self._rpc(self.models.GetModelStatus, request))

    def metadata(self) -> dict:
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec)
        response = self._rpc(self.predictions.GetModelMetadata, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {"model_spec": _json_dict(response.model_spec), "metadata": {"signature_def": _json_dict(signature_map)}}

    def close(self) -> None:
        self.channel.close()


class ServingClient:
    """Predict, status and metadata of one model on a TF Serving-compatible server."""

    def __init__(self, target: str, model_name: str = "mdmt", protocol: str = "rest", version: int | None = None,
                 version_label: str | None = None, signature: str = "serving_default", timeout: float = 10.0,
                 retries: int = 2, backoff: float = 0.2, rest_format: str = "columnar"):
        from mdmt_tf.errors import ConfigError

        checks = [(protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}, got {protocol!r}"),
                  (version is None or version_label is None, "give a version or a version label, not both"),
                  (rest_format in REST_FORMATS, f"rest_format must be one of {REST_FORMATS}, got {rest_format!r}"),
                  (timeout > 0 and retries >= 0 and backoff >= 0, "timeout must be > 0, retries and backoff >= 0")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.target, self.model_name, self.protocol = target, model_name, protocol
        self.signature, self.retries, self.backoff = signature, retries, backoff
        if protocol == "rest":
            path = quote(model_name, safe="")
            path += f"/versions/{version}" if version is not None else ""
            path += f"/labels/{quote(version_label, safe='')}" if version_label is not None else ""
            self._transport = _Rest(target, path, timeout, rest_format == "row")
        else:
            spec = {"name": model_name, "version": version, "label": version_label}
            self._transport = _Grpc(target, spec, timeout)
        self._signature_defs: dict | None = None

    # ------------------------------------------------------------------ calls
    def _retrying(self, call, *args):
        for attempt in range(self.retries + 1):
            try:
                return call(*args)
            except ServingError as err:
                if not err.retryable or attempt == self.retries:
                    raise ServingError(err.protocol, err.code, err.message, err.target, attempt + 1) from None
                time.sleep(self.backoff * (2 ** attempt))

    def status(self) -> dict:
        """{"model_version_status": [{"version", "state", "status"}...]} (TF Serving's REST shape)."""
        return self._retrying(self._transport.status)

    def metadata(self) -> dict:
        """{"model_spec": ..., "metadata": {"signature_def": {"signature_def": {name: SignatureDef}}}}."""
        return self._retrying(self._transport.metadata)

    def signature_def(self, signature: str) -> dict:
        if self._signature_defs is None:
            self._signature_defs = self.metadata()["metadata"]["signature_def"]["signature_def"]
        if signature not in self._signature_defs:
            from mdmt_tf.errors import ConfigError

            valid = sorted(s for s in self._signature_defs if not s.startswith("__"))
            raise ConfigError(f"model {self.model_name!r} has no signature {signature!r}; it has {valid}")
        return self._signature_defs[signature]

    def input_dtypes(self, signature: str) -> dict[str, str]:
        """input name -> DataType name (e.g. "DT_STRING") from the model's metadata."""
        return {name: info.get("dtype", "DT_INVALID") for name, info in self.signature_def(signature)["inputs"].items()}

    def predict(self, inputs: Mapping[str, Sequence], signature: str | None = None) -> dict[str, np.ndarray]:
        """Any signature: inputs by name -> {output: float32 array}."""
        signature = signature or self.signature
        dtypes = self.input_dtypes(signature)
        arrays = {name: _as_input(values, dtypes.get(name, "")) for name, values in inputs.items()}
        answer = self._retrying(self._transport.predict, signature, arrays, dtypes)
        if self.protocol == "grpc":
            return answer
        return codec.decode_outputs(answer, sorted(self.signature_def(signature)["outputs"]))

    def model_info(self) -> ModelInfo:
        """The served model's ModelInfo, from its `model_info` signature (one Predict call)."""
        if self._signature_defs is None:
            self._signature_defs = self.metadata()["metadata"]["signature_def"]["signature_def"]
        if MODEL_INFO not in self._signature_defs:
            raise ModelInfoUnavailable(
                f"model {self.model_name!r} at {self.target} has no '{MODEL_INFO}' signature: it was exported before "
                "mdmt_tf added one (or not by mdmt_tf). Export it again with this version (mdmt train, or the "
                "pipeline's Trainer) and publish it, or pass the spec yourself (mdmt predict --spec; an mdmt_tf "
                "model carries it as assets.extra/spec.yaml)")
        answer = self._retrying(self._transport.predict, MODEL_INFO, {"request": np.zeros((), np.int32)},
                                {"request": "DT_INT32"}, True)
        if self.protocol == "rest":
            answer = codec.output_values(answer, sorted(self._signature_defs[MODEL_INFO]["outputs"]))
        else:
            answer = {name: value.tolist() for name, value in answer.items()}
        try:
            return ModelInfo.from_outputs(answer)
        except (KeyError, IndexError, ValueError, UnicodeDecodeError) as err:
            raise ModelInfoUnavailable(f"model {self.model_name!r} at {self.target} answered '{MODEL_INFO}' with "
                                       f"something this client cannot read ({type(err).__name__}: {err})") from None

    def predict_examples(self, examples: Sequence[bytes]) -> dict[str, np.ndarray]:
        """Serialized tf.train.Examples through `signature` (default serving_default)."""
        return self.predict({"examples": [bytes(e) for e in examples]})

    def predict_raw(self, features: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
        """One list / array per raw feature through the `predict_raw` signature."""
        return self.predict(features, signature="predict_raw")

    def wait_until_available(self, timeout: float = 60.0, interval: float = 0.25) -> dict:
        """Poll status until some version is AVAILABLE; returns the status."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                status = self._transport.status()
                if any(v.get("state") == "AVAILABLE" for v in status.get("model_version_status", [])):
                    return status
                last = f"no version AVAILABLE yet: {status}"
            except ServingError as err:
                last = str(err)
            time.sleep(interval)
        raise ServingError(self.protocol, "UNAVAILABLE", f"model {self.model_name!r} not available after {timeout} s "
                                                         f"({last})", self.target)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_input(values, dtype: str) -> np.ndarray:
    """Plain values as the array the signature wants: strings as bytes, numbers cast."""
    if dtype == "DT_STRING":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in np.asarray(values, dtype=object).reshape(-1)]
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(np.shape(values))
    numpy_type = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT64": np.int64, "DT_INT32": np.int32,
                  "DT_BOOL": np.bool_}.get(dtype)
    return np.asarray(values, dtype=numpy_type)
