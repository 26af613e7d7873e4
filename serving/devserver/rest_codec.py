"""TF Serving's REST JSON for Predict, the server's side: parse requests, format answers.
(The client has its own codec, serving/codec.py.)

Requests come in two formats (TF Serving's json_tensor rules):
  row       {"signature_name": S, "instances": [row, ...]}: a row is a value (one-input
            signatures) or an object {input: value}; answered {"predictions": [...]}.
  columnar  {"signature_name": S, "inputs": {input: [values]}} (or a bare list for
            one-input signatures); answered {"outputs": {...}}.
Binary strings travel as {"b64": "<base64>"}. A float input takes any JSON number that
fits a float32 without loss; NaN and Infinity are accepted as TF Serving does.

Every violation raises INVALID_ARGUMENT with TF Serving's message where it has one,
naming the input (and the row, in row format).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re

import numpy as np

from .signatures import SignatureInfo, TensorInfo, dtype_name
from .status import StatusError, invalid

_WEB_SAFE_B64 = re.compile(r"[A-Za-z0-9_-]*={0,2}")
MAX_RANK = 32  # deeper nesting is refused before recursing into it
_FLOAT_LIMITS = {"float": (float(np.finfo(np.float32).max), (1 << 24) - 1),
                 "double": (float(np.finfo(np.float64).max), (1 << 53) - 1),
                 "half": (float(np.finfo(np.float16).max), (1 << 11) - 1)}
_INT_LIMITS = {name: (int(np.iinfo(name).min), int(np.iinfo(name).max))
               for name in ("int8", "int16", "int32", "int64", "uint8", "uint32", "uint64")}


def _json_type(value) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    return {dict: "Object", list: "Array", str: "String"}.get(type(value), "Number")


def _show(value) -> str:
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= 200 else text[:200] + "..."


def is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _decode_b64(value) -> bytes:
    text = value["b64"]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    if _WEB_SAFE_B64.fullmatch(text):  # the web-safe alphabet, padding optional
        try:
            return base64.urlsafe_b64decode(text + "=" * (-len(text.rstrip("=")) % 4))
        except (binascii.Error, ValueError):
            pass
    raise invalid(f"Unable to base64 decode {_show(value)}")


def _type_error(value, dtype: str):
    return invalid(f"JSON Value: {_show(value)} Type: {_json_type(value)} is not of expected type: {dtype}")


def _leaf(value, dtype: str):
    """One JSON scalar as a value of `dtype` (TF Serving's AddValueToTensor rules)."""
    if dtype == "string":
        if isinstance(value, str):
            return value.encode("utf-8", "surrogatepass")
        if is_b64(value):
            return _decode_b64(value)
        if isinstance(value, dict):
            raise invalid(f"JSON Value: {_show(value)} not formatted correctly for base64 data")
        raise _type_error(value, dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if dtype == "bool" and isinstance(value, bool):
            return value
        raise _type_error(value, dtype)
    if dtype in _FLOAT_LIMITS:
        largest, max_int = _FLOAT_LIMITS[dtype]
        lossy = abs(value) > max_int if isinstance(value, int) else (math.isfinite(value) and abs(value) > largest)
        if lossy:
            raise invalid(f"Cannot convert JSON value: {_show(value)} to {dtype} without loss of precision.")
        return value
    if dtype in _INT_LIMITS and isinstance(value, int) and _INT_LIMITS[dtype][0] <= value <= _INT_LIMITS[dtype][1]:
        return value
    raise _type_error(value, dtype)


def _dense_shape(value) -> list[int]:
    shape, probe = [], value
    while isinstance(probe, list):
        shape.append(len(probe))
        if len(shape) > MAX_RANK:
            raise invalid(f"JSON value is nested more than {MAX_RANK} lists deep; tensors of that rank are not "
                          "supported")
        if not probe:
            break
        probe = probe[0]
    return shape


def _fill(value, level: int, shape: list[int], dtype: str, out: list) -> None:
    if not isinstance(value, list):
        if level != len(shape):
            raise invalid(f"JSON Value: {_show(value)} found at incorrect level: {level + 1} in the JSON DOM. "
                          f"Expected at level: {len(shape)}")
        out.append(_leaf(value, dtype))
        return
    if level >= len(shape):
        raise invalid(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(value) != shape[level]:
        raise invalid(f"Encountered list at unexpected size: {len(value)} at level: {level} expected size: "
                      f"{shape[level]}")
    for item in value:
        _fill(item, level + 1, shape, dtype, out)


def to_array(value, spec: TensorInfo) -> np.ndarray:
    """A JSON value (scalar or nested lists) as a dense array of the input's dtype."""
    dtype = dtype_name(spec.dtype)
    np_dtype = spec.numpy_dtype
    shape = _dense_shape(value)
    flat: list = []
    _fill(value, 0, shape, dtype, flat)
    array = np.empty(len(flat), dtype=object) if np.dtype(np_dtype).kind == "O" else None
    if array is not None:
        array[:] = flat
    else:
        array = np.asarray(flat, dtype=np_dtype)
    return array.reshape(shape)


# --------------------------------------------------------------------- requests
@dataclasses.dataclass
class PredictCall:
    signature: str
    inputs: dict[str, np.ndarray]
    row_format: bool


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object (TF Serving's ParseJson messages)."""
    if not body.strip():
        raise invalid("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise invalid(f"JSON Parse error: {err}") from None
    if not isinstance(doc, dict):
        raise invalid(f"JSON Value: {_show(doc)} Is not object")
    return doc


def count_rows(doc: dict) -> int:
    """The rows (0th-dimension size) a predict body asks for, before anything is converted:
    the length of `instances`, or of the longest list among `inputs`."""
    instances, inputs = doc.get("instances"), doc.get("inputs")
    if isinstance(instances, list):
        return len(instances)
    if isinstance(inputs, list):
        return len(inputs)
    if isinstance(inputs, dict):
        return max((len(v) for v in inputs.values() if isinstance(v, list)), default=0)
    return 0


def signature_name(doc: dict) -> str:
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid(f"JSON Value: {_show(doc)} not formatted correctly. 'signature_name' key must be a string "
                      "value.")
    return name or "serving_default"


def _rows(instances: list, info: SignatureInfo) -> dict[str, np.ndarray]:
    names = sorted(info.inputs)
    named = isinstance(instances[0], dict) and not is_b64(instances[0])
    if not named and len(names) > 1:
        raise invalid("instances is a plain list, but expecting list of objects as multiple input tensors "
                      f"required as per tensorinfo_map (inputs: {','.join(names)})")
    columns: dict[str, list] = {n: [] for n in names}
    for index, row in enumerate(instances):
        row_named = isinstance(row, dict) and not is_b64(row)
        if row_named != named:
            kind = "object" if named else "value/list"
            raise invalid(f"Expecting {kind} but got {'object' if row_named else 'list'} at item {index} of input list")
        if not named:
            columns[names[0]].append(row)
            continue
        if set(row) != set(names):
            raise invalid(f"Failed to process element: {index} of 'instances' list. JSON object: {_show(row)} keys "
                          f"must be equal to: {','.join(names)} (missing: {sorted(set(names) - set(row))}, "
                          f"unexpected: {sorted(set(row) - set(names))})")
        for name in names:
            columns[name].append(row[name])
    out = {}
    for name, values in columns.items():
        try:
            out[name] = to_array(values, info.inputs[name])
        except StatusError as err:
            raise _row_error(name if named else None, values, info.inputs[name], err) from None
    return out


def _row_error(name: str | None, values: list, spec: TensorInfo, err: StatusError) -> StatusError:
    """The failure of a whole 'instances' column, pinned to its first bad row if one is."""
    key = f" key: {name}" if name else ""
    for index, value in enumerate(values):
        try:
            to_array(value, spec)
        except StatusError as row_err:
            return invalid(f"Failed to process element: {index}{key} of 'instances' list. Error: {row_err.message}")
    return invalid(f"Failed to process{key or ' input'} of 'instances' list (rows differ in shape). "
                   f"Error: {err.message}")


def _columns(inputs, info: SignatureInfo) -> dict[str, np.ndarray]:
    names = sorted(info.inputs)
    if not isinstance(inputs, dict) or is_b64(inputs):
        if len(names) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple input tensors "
                          f"required as per tensorinfo_map (inputs: {','.join(names)})")
        return {names[0]: to_array(inputs, info.inputs[names[0]])}
    out = {}
    for name in names:
        if name not in inputs:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        try:
            out[name] = to_array(inputs[name], info.inputs[name])
        except StatusError as err:
            raise invalid(f"Input '{name}': {err.message}") from None
    return out


def parse_predict(doc: dict, info: SignatureInfo) -> PredictCall:
    """A parsed request body -> tensors for signature `info` (which the caller looked up
    from the body's signature_name)."""
    has_rows, has_columns = "instances" in doc, "inputs" in doc
    if has_rows and has_columns:
        raise invalid(f"JSON Value: {_show(doc)} Not formatted correctly expecting only one of 'inputs' or "
                      "'instances' keys to exist ")
    if has_rows:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise invalid(f"JSON Value: {_show(doc)} Excepting 'instances' to be an list/array")
        if not instances:
            raise invalid(f"JSON Value: {_show(doc)} No values in 'instances' array")
        return PredictCall(info.name, _rows(instances, info), row_format=True)
    if has_columns:
        return PredictCall(info.name, _columns(doc["inputs"], info), row_format=False)
    raise invalid("Missing 'inputs' or 'instances' key")


# -------------------------------------------------------------------- responses
def _json_values(array: np.ndarray, bytes_as_b64: bool = False):
    """Nested lists of JSON values; floats in their shortest round-trip form (as TF Serving)."""
    if array.dtype.kind == "f":
        flat = [float(s) for s in array.reshape(-1).astype(str)]
    elif array.dtype.kind in "OS":
        flat = [_string_value(v, bytes_as_b64) for v in array.reshape(-1)]
    else:
        flat = array.reshape(-1).tolist()
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape).tolist()


def _string_value(value, as_b64: bool):
    raw = value if isinstance(value, bytes) else str(value).encode()
    if not as_b64:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(raw).decode("ascii")}


def predict_response(outputs: dict[str, np.ndarray], row_format: bool) -> dict:
    """{"predictions": [...]} (row) or {"outputs": ...} (columnar); one output: no keys."""
    names = sorted(outputs)
    values = {n: _json_values(outputs[n], n.endswith("_bytes")) for n in names}
    if not row_format:
        return {"outputs": values if len(names) > 1 else values[names[0]]}
    batch = {n: len(v) if isinstance(v, list) else None for n, v in values.items()}
    if None in batch.values() or len(set(batch.values())) > 1:
        raise invalid(f"Tensors have inconsistent or missing batch sizes {batch}: cannot format row predictions")
    if len(names) == 1:
        return {"predictions": values[names[0]]}
    count = next(iter(batch.values()))
    return {"predictions": [{n: values[n][i] for n in names} for i in range(count)]}
