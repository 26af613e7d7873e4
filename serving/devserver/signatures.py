"""What a signature accepts, and checking a request's tensors against it.

`SignatureInfo` is read from the SignatureDef protos in saved_model.pb (exactly what TF
Serving reports as metadata), not from Python objects, so the dev server validates and
describes inputs the way the real server sees them. `check_inputs` is the one gate every
request passes (REST and gRPC alike): names, dtypes, ranks and equal batch sizes, each
failure an INVALID_ARGUMENT naming the input.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tensorflow.core.framework import types_pb2

from .status import invalid

# DataType enum -> (short name used in messages, numpy dtype); strings are object arrays of bytes
DTYPES = {
    types_pb2.DT_STRING: ("string", np.dtype(object)),
    types_pb2.DT_FLOAT: ("float", np.dtype(np.float32)),
    types_pb2.DT_DOUBLE: ("double", np.dtype(np.float64)),
    types_pb2.DT_HALF: ("half", np.dtype(np.float16)),
    types_pb2.DT_INT8: ("int8", np.dtype(np.int8)),
    types_pb2.DT_INT16: ("int16", np.dtype(np.int16)),
    types_pb2.DT_INT32: ("int32", np.dtype(np.int32)),
    types_pb2.DT_INT64: ("int64", np.dtype(np.int64)),
    types_pb2.DT_UINT8: ("uint8", np.dtype(np.uint8)),
    types_pb2.DT_UINT32: ("uint32", np.dtype(np.uint32)),
    types_pb2.DT_UINT64: ("uint64", np.dtype(np.uint64)),
    types_pb2.DT_BOOL: ("bool", np.dtype(bool)),
}


def dtype_name(dtype: int) -> str:
    return DTYPES[dtype][0] if dtype in DTYPES else types_pb2.DataType.Name(dtype)


def array_dtype_name(array: np.ndarray) -> str:
    """The TF name of a numpy array's dtype ('string' for bytes / str / object arrays)."""
    if array.dtype.kind in "OSU":
        return "string"
    for name, np_dtype in DTYPES.values():
        if np_dtype == array.dtype:
            return name
    return str(array.dtype)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One input or output of a signature: alias, dtype enum, shape (None = unknown rank;
    -1 = unknown dimension)."""

    alias: str
    dtype: int
    shape: tuple[int, ...] | None

    @classmethod
    def from_proto(cls, alias: str, proto) -> "TensorInfo":
        shape = None if proto.tensor_shape.unknown_rank else tuple(d.size for d in proto.tensor_shape.dim)
        return cls(alias, proto.dtype, shape)

    @property
    def numpy_dtype(self) -> np.dtype:
        if self.dtype not in DTYPES:
            raise invalid(f"input '{self.alias}' has dtype {dtype_name(self.dtype)}, which this server does not "
                          f"support; supported: {sorted(n for n, _ in DTYPES.values())}")
        return DTYPES[self.dtype][1]

    def shape_text(self) -> str:
        return "[?]" if self.shape is None else "[" + ",".join(str(d) for d in self.shape) + "]"


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]

    @classmethod
    def from_proto(cls, name: str, proto) -> "SignatureInfo":
        return cls(name, {k: TensorInfo.from_proto(k, v) for k, v in proto.inputs.items()},
                   {k: TensorInfo.from_proto(k, v) for k, v in proto.outputs.items()})


def _check_names(info: SignatureInfo, arrays: dict) -> None:
    sent, wanted = set(arrays), set(info.inputs)
    if sent != wanted:
        raise invalid(
            f"input size does not match signature: {len(sent)}!={len(wanted)} len({{{','.join(sorted(sent))}}}) "
            f"!= len({{{','.join(sorted(wanted))}}}). Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
            f"Missing but required: {{{','.join(sorted(wanted - sent))}}}.")


def _check_tensor(spec: TensorInfo, array: np.ndarray) -> None:
    expected, got = dtype_name(spec.dtype), array_dtype_name(array)
    if expected != got:
        raise invalid(f"Expects arg '{spec.alias}' to be {expected} but {got} is provided")
    if spec.shape is None:
        return
    if array.ndim != len(spec.shape) or any(d not in (-1, n) for d, n in zip(spec.shape, array.shape)):
        shape = "[" + ",".join(str(n) for n in array.shape) + "]"
        raise invalid(f"input '{spec.alias}' has shape {shape} but the signature expects {spec.shape_text()} "
                      "(-1: any size)")


def check_inputs(info: SignatureInfo, arrays: dict[str, np.ndarray]) -> None:
    """Raise INVALID_ARGUMENT unless `arrays` has exactly the signature's inputs, each of
    its dtype and rank, all with the same batch (0th) dimension."""
    _check_names(info, arrays)
    for alias, array in arrays.items():
        _check_tensor(info.inputs[alias], array)
    batch = {alias: array.shape[0] for alias, array in arrays.items() if array.ndim > 0}
    if len(set(batch.values())) > 1:
        raise invalid(f"input tensors must have equal 0th-dimension size; got {dict(sorted(batch.items()))}")
