"""The model server's operations, independent of the wire: predict, status, metadata.

The REST and gRPC layers parse their requests, call these, and encode the answers (or
the StatusError) their own way, so both APIs resolve versions and labels, validate
inputs and report errors identically.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tensorflow_serving.apis import get_model_metadata_pb2

from .repository import ModelRepository
from .servable import Servable
from .status import StatusError, invalid

SIGNATURE_DEF = "signature_def"


def too_large(size: int, limit: int) -> StatusError:
    return invalid(f"Request of {size} bytes exceeds this server's limit of {limit} bytes (--max-request-bytes); "
                   "send fewer rows per request")


def too_many_rows(rows: int, limit: int) -> StatusError:
    return invalid(f"Request of {rows} rows exceeds this server's limit of {limit} rows (--max-request-rows); "
                   "send fewer rows per request")


@dataclasses.dataclass(frozen=True)
class ModelRequest:
    """Which model a request names: name plus at most one of version / label."""

    name: str
    version: int | None = None
    label: str | None = None


class ModelApi:
    def __init__(self, repository: ModelRepository, max_request_bytes: int, max_request_rows: int):
        self.repository = repository
        self.max_request_bytes, self.max_request_rows = max_request_bytes, max_request_rows

    def check_size(self, size: int) -> None:
        if size > self.max_request_bytes:
            raise too_large(size, self.max_request_bytes)

    def check_rows(self, rows: int) -> None:
        """Refuse a request of more rows (0th-dimension size) than --max-request-rows."""
        if rows > self.max_request_rows:
            raise too_many_rows(rows, self.max_request_rows)

    def servable(self, request: ModelRequest) -> Servable:
        return self.repository.servable(request.name, request.version, request.label)

    @staticmethod
    def predict(servable: Servable, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return servable.predict(signature, inputs)

    def status(self, request: ModelRequest):
        # like TF Serving, a label in a status request is ignored: all versions are reported
        return self.repository.status(request.name, request.version)

    def metadata(self, request: ModelRequest, fields=(SIGNATURE_DEF,)):
        """GetModelMetadataResponse with the SignatureDefMap packed under 'signature_def'."""
        if not fields:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field != SIGNATURE_DEF:
                raise invalid(f"Metadata field {field} is not supported")
        servable = self.servable(request)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, proto in servable.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(proto)
        response.metadata[SIGNATURE_DEF].Pack(signature_map)
        return response
