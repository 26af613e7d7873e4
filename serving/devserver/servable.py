"""One loaded version of a SavedModel: its signatures, their metadata, and predict.

Predict validates the request's tensors against the SignatureDef (signatures.py), runs
the signature's concrete function on slices of at most `batch_rows` rows (so a large
request's intermediate tensors stay bounded: memory grows with the slice, not with the
request; the answers are concatenated), and turns TensorFlow's errors into canonical
statuses with readable messages: TF reports an op failure as "Graph execution error:
... Detected at node ... <the message> [[{{node ...}}]]", of which only the message
means anything to a client (e.g. "Feature: age (data type: float) is required but could
not be found", or mdmt's "unknown value of domain column 'domain_id'; known values: [...]").
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from .signatures import SignatureInfo, check_inputs
from .status import CODE_BY_NUMBER, StatusError, invalid

log = logging.getLogger("serving")

WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # as TF Serving
DEFAULT_BATCH_ROWS = 4096  # serving/config/batching.config's max_batch_size


def clean_tf_message(message: str) -> str:
    """The client-relevant part of a TensorFlow op error message."""
    text = message.split("<stack traces unavailable>\n", 1)[-1]
    text = re.split(r"\n\t \[\[", text, maxsplit=1)[0]
    text = re.sub(r"^Graph execution error:\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\]\s*$", "", text).replace("\\'", "'").strip()
    assertion = re.match(r"assertion failed: \[(.*?)\s*\] \[", text, flags=re.S)
    return assertion.group(1).strip() if assertion else text


def read_signature_defs(path: Path) -> dict:
    """name -> SignatureDef proto of the SavedModel's (first) serving meta graph."""
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    for graph in proto.meta_graphs:
        if "serve" in graph.meta_info_def.tags:
            return dict(graph.signature_def)
    return dict(proto.meta_graphs[0].signature_def) if proto.meta_graphs else {}


def _tensor(alias: str, array: np.ndarray, dtype: int) -> tf.Tensor:
    try:
        return tf.convert_to_tensor(array, dtype=tf.as_dtype(dtype))
    except (TypeError, ValueError) as err:  # e.g. values that do not fit the dtype
        raise invalid(f"input '{alias}': cannot convert to {tf.as_dtype(dtype).name}: {err}") from None


def _first_unparsable_example(examples: np.ndarray) -> int | None:
    from tensorflow.core.example import example_pb2

    for index, record in enumerate(examples.reshape(-1)):
        try:
            example_pb2.Example.FromString(bytes(record))
        except Exception:  # protobuf DecodeError and friends
            return index
    return None


class Servable:
    """A SavedModel version loaded for serving (thread-safe: TF functions are)."""

    def __init__(self, name: str, version: int, path: str | Path, batch_rows: int = DEFAULT_BATCH_ROWS):
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        self.name, self.version, self.path, self.batch_rows = name, int(version), Path(path), batch_rows
        self.signature_defs = read_signature_defs(self.path)
        self._loaded = tf.saved_model.load(str(self.path))
        self._functions = dict(self._loaded.signatures)
        self.signatures = {k: SignatureInfo.from_proto(k, v) for k, v in self.signature_defs.items()
                           if k in self._functions}

    def find_signature(self, name: str) -> SignatureInfo | None:
        return self.signatures.get(name or "serving_default")

    def predict(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `signature` on validated inputs, `batch_rows` rows at a time; raises
        StatusError on any bad input."""
        info = self.signatures[signature]
        check_inputs(info, inputs)
        rows = {a.shape[0] for a in inputs.values() if a.ndim > 0}
        count = rows.pop() if rows and all(a.ndim > 0 for a in inputs.values()) else None
        if count is None or count <= self.batch_rows:
            return self._run(signature, info, inputs, inputs)
        parts: dict[str, list] = {}
        for start in range(0, count, self.batch_rows):
            piece = {k: v[start:start + self.batch_rows] for k, v in inputs.items()}
            size = min(self.batch_rows, count - start)
            for name, value in self._run(signature, info, piece, inputs).items():
                if value.ndim == 0 or value.shape[0] != size:
                    raise invalid(f"signature '{signature}' answers output '{name}' of shape {list(value.shape)} to "
                                  f"{size} rows, so it cannot be scored in slices; send at most "
                                  f"{self.batch_rows} rows per request")
                parts.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in parts.items()}

    def _run(self, signature: str, info: SignatureInfo, inputs: dict[str, np.ndarray],
             request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The signature's function on `inputs` (a slice of `request`, whose rows an error names)."""
        tensors = {k: _tensor(k, v, info.inputs[k].dtype) for k, v in inputs.items()}
        try:
            outputs = self._functions[signature](**tensors)
        except tf.errors.OpError as err:
            if "Could not parse example input" in err.message:
                raise invalid(self._undecodable_message(request)) from None
            raise StatusError(CODE_BY_NUMBER.get(err.error_code, "UNKNOWN"), clean_tf_message(err.message)) from None
        except UnicodeDecodeError:  # TF's message quoted undecodable input bytes
            raise invalid(self._undecodable_message(request)) from None
        return {k: np.asarray(v.numpy()) for k, v in outputs.items()}  # a scalar string's numpy() is bytes

    @staticmethod
    def _undecodable_message(inputs: dict[str, np.ndarray]) -> str:
        for alias, array in inputs.items():
            if array.dtype == object:
                index = _first_unparsable_example(array)
                if index is not None:
                    return (f"Could not parse example input: {alias}[{index}] is not a serialized tf.train.Example "
                            f"({len(bytes(array.reshape(-1)[index]))} bytes)")
        return "Could not parse example input (an input string is not a serialized tf.train.Example)"

    def warm_up(self) -> int:
        """Replay assets.extra/tf_serving_warmup_requests like TF Serving; returns how many
        requests ran (0, with an INFO log line, when the model has no warmup file: not an
        error, SavedModels exported elsewhere may carry none). A failing warmup request
        fails the load, as in TF Serving."""
        from tensorflow_serving.apis import prediction_log_pb2

        path = self.path / "assets.extra" / WARMUP_FILE
        if not path.exists():
            log.info("%s version %d: no warmup file found at %s; serving without warmup",
                     self.name, self.version, path)
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(str(path)).take(MAX_WARMUP_RECORDS):
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            if entry.WhichOneof("log_type") != "predict_log":
                continue
            request = entry.predict_log.request
            signature = request.model_spec.signature_name or "serving_default"
            if signature not in self.signatures:
                raise invalid(f"warmup request {count + 1} names signature {signature!r}, which the model lacks")
            self.predict(signature, {k: tf.make_ndarray(v) for k, v in request.inputs.items()})
            count += 1
        return count
