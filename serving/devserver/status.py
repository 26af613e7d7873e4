"""Canonical status codes, as TF Serving uses them on both of its APIs.

The server side raises `StatusError(code, message)`; the REST layer turns it into TF
Serving's HTTP status (the table below is TF Serving's `ToHTTPStatusCode`) and an
`{"error": message}` body, the gRPC layer into the same-named gRPC status code. Keeping
one code per failure means the two APIs can never disagree about what went wrong.
"""
from __future__ import annotations

import grpc

# canonical code name -> HTTP status, as tensorflow_model_server maps them
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
# TensorFlow's error codes (tf.errors.*.error_code) are the canonical numbers
CODE_BY_NUMBER = {code.value[0]: code.name for code in grpc.StatusCode}


class StatusError(Exception):
    """A request failed with canonical status `code` (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, message: str):
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown status code {code!r}; valid: {sorted(HTTP_STATUS)}")
        super().__init__(message)
        self.code, self.message = code, message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]


def invalid(message: str) -> StatusError:
    return StatusError("INVALID_ARGUMENT", message)


def not_found(message: str) -> StatusError:
    return StatusError("NOT_FOUND", message)
