"""The client's side of TF Serving's REST JSON: input arrays -> JSON values, predict
answers -> arrays. Independent of the development stand-in (serving/devserver/).

Inputs: numbers as JSON numbers; strings as text when they are printable UTF-8, anything
else (serialized tf.Examples) as {"b64": "<base64>"}, which TF Serving decodes for a
DT_STRING input. Answers: {"outputs": ...} (columnar) or {"predictions": [...]} (row);
with one output, TF Serving drops its name, so the caller passes the signature's output
names. Floats come back in their shortest round-trip form, so float32 values are exact.
"""
from __future__ import annotations

import base64
import json

import numpy as np


def _string(value) -> str | dict:
    raw = value if isinstance(value, bytes) else str(value).encode()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return text
    return {"b64": base64.b64encode(raw).decode("ascii")}


def encode_column(array: np.ndarray, is_string: bool) -> list:
    """An input array as nested JSON values (see the module doc)."""
    if not is_string:
        return array.tolist()
    flat = [_string(v) for v in array.reshape(-1)]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape).tolist()


def output_values(doc: dict, output_names: list[str]) -> dict:
    """A predict answer (either format) -> {output: JSON value (nested lists)}."""
    if "outputs" in doc:
        outputs = doc["outputs"]
        return outputs if isinstance(outputs, dict) else {output_names[0]: outputs}
    if "predictions" in doc:
        rows = doc["predictions"]
        if rows and isinstance(rows[0], dict):
            return {name: [row[name] for row in rows] for name in rows[0]}
        return {output_names[0]: rows}
    text = json.dumps(doc)
    raise ValueError(f"the answer has neither 'outputs' nor 'predictions': {text[:200]}")


def decode_outputs(doc: dict, output_names: list[str]) -> dict[str, np.ndarray]:
    """A predict answer (either format) -> {output: float32 array}."""
    return {name: np.asarray(v, dtype=np.float32) for name, v in output_values(doc, output_names).items()}


def decode_string(value) -> str:
    """A DT_STRING output value as text: a JSON string, or {"b64": ...} (outputs named *_bytes)."""
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"]).decode("utf-8")
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)
