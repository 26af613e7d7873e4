"""The client's one error type: what the server (or the network) said, unaltered."""
from __future__ import annotations

from mdmt_tf.errors import ConfigError, MdmtError

# failures worth retrying: the server was not reachable or said it is unavailable;
# anything else (a 4xx, INVALID_ARGUMENT, NOT_FOUND...) fails the same way every time
RETRYABLE_HTTP = frozenset({502, 503, 504})
RETRYABLE_GRPC = frozenset({"UNAVAILABLE"})


class ServingError(MdmtError):
    """A request to a model server failed.

    protocol: "rest" or "grpc"; code: the HTTP status (int) or the gRPC status code name
    (e.g. "INVALID_ARGUMENT"), or "UNAVAILABLE" when the server could not be reached;
    message: the server's own error message (REST `{"error": ...}`, gRPC details).
    """

    def __init__(self, protocol: str, code: int | str, message: str, target: str = "", attempts: int = 1):
        self.protocol, self.code, self.message, self.target, self.attempts = protocol, code, message, target, attempts
        where = f" from {target}" if target else ""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{protocol.upper()} {code}{where}{tries}: {message}")

    @property
    def retryable(self) -> bool:
        if self.protocol == "rest":
            return self.code == "UNAVAILABLE" or self.code in RETRYABLE_HTTP
        return self.code in RETRYABLE_GRPC


class ModelInfoUnavailable(ConfigError):
    """The served model has no readable `model_info` signature (exported before it existed,
    or not by mdmt_tf); the message says what to do instead."""
