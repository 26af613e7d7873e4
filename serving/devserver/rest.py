"""TF Serving's REST API, served by serving.devserver.http (an I/O thread and a worker pool).

Routes (TF Serving's regular expressions; names and labels are URL-decoded):
  GET  /v1/models/NAME[/versions/N | /labels/L][/metadata]   status / metadata
  POST /v1/models/NAME[/versions/N | /labels/L]:predict      predict
Anything else under /v1/ is TF Serving's 400 "Malformed request: METHOD PATH"; other paths
404. Errors are `{"error": "<message>"}` with TF Serving's HTTP status for the canonical
code (serving.status). :classify and :regress answer 501: this server implements predict.

The body is read with a size limit (--max-request-bytes): an oversized one is drained (so the
client sees the answer instead of a reset connection) up to DRAIN_LIMIT and refused with 400.
A request of more rows than --max-request-rows is refused with 400 before its values are
converted (the row count is the length of `instances`, or of the longest `inputs` list).
"""
from __future__ import annotations

import logging
import re
from urllib.parse import unquote

from google.protobuf import json_format

from . import rest_codec
from .api import SIGNATURE_DEF, ModelApi, ModelRequest, too_large
from .http import HttpServer, Request, Response
from .status import StatusError, invalid

log = logging.getLogger("serving")

PREDICT_PATH = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)")
STATUS_PATH = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?")
DRAIN_LIMIT = 256 << 20  # beyond this an oversized body is not read; the connection is closed


def _model_request(name: str | None, version: str | None, label: str | None) -> ModelRequest:
    if not name:
        raise invalid("Missing model name in request.")
    try:
        number = int(version) if version else None
    except ValueError:
        raise invalid(f"Failed to convert version: {version} to numeric.") from None
    return ModelRequest(unquote(name), number, unquote(label) if label else None)


def _to_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


class RestApi:
    """method + path + body -> (HTTP status, JSON document); no sockets involved."""

    def __init__(self, api: ModelApi):
        self.api = api

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        try:
            return 200, self._dispatch(method, path.split("?", 1)[0], body)
        except StatusError as err:
            return err.http_status, {"error": err.message}
        except Exception as err:  # a server bug; never a client's fault
            log.exception("internal error on %s %s", method, path)
            return 500, {"error": f"Internal error: {type(err).__name__}: {err}"}

    def _dispatch(self, method: str, path: str, body: bytes) -> dict:
        predict = PREDICT_PATH.fullmatch(path)
        if method == "POST" and predict:
            name, version, label, verb = predict.groups()
            if verb.lower() != "predict":
                raise StatusError("UNIMPLEMENTED", f":{verb} is not implemented by the mdmt development server; "
                                                   "use :predict (tensorflow_model_server implements all three)")
            return self._predict(_model_request(name, version, label), body)
        status = STATUS_PATH.fullmatch(path)
        if method == "GET" and status:
            name, version, label, metadata = status.groups()
            request = _model_request(name, version, label)
            if metadata:
                return self._metadata(request)
            return _to_dict(self.api.status(request))
        raise invalid(f"Malformed request: {method} {path}")

    def _predict(self, request: ModelRequest, body: bytes) -> dict:
        self.api.check_size(len(body))
        doc = rest_codec.parse_json(body)
        self.api.check_rows(rest_codec.count_rows(doc))
        signature = rest_codec.signature_name(doc)
        servable = self.api.servable(request)
        info = servable.find_signature(signature)
        if info is None:
            raise invalid(f'Serving signature name: "{signature}" not found in signature def')
        call = rest_codec.parse_predict(doc, info)
        outputs = self.api.predict(servable, call.signature, call.inputs)
        return rest_codec.predict_response(outputs, call.row_format)

    def _metadata(self, request: ModelRequest) -> dict:
        response = self.api.metadata(request)
        from tensorflow_serving.apis import get_model_metadata_pb2

        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata[SIGNATURE_DEF].Unpack(signature_map)
        return {"model_spec": _to_dict(response.model_spec), "metadata": {SIGNATURE_DEF: _to_dict(signature_map)}}


def respond(rest: RestApi, request: Request) -> Response:
    """One HTTP request -> its answer: the API under /v1/, 404 elsewhere, status only for HEAD."""
    path = request.path.split("?", 1)[0]
    if request.method == "HEAD":  # no body may follow a HEAD answer: status only
        return Response(400 if path.lower().startswith("/v1/") else 404, None, close=True)
    if not path.lower().startswith("/v1/"):
        return Response(404, {"error": f"Not found: {path} (the API lives under /v1/models)"})
    body = request.body if request.method == "POST" else b""
    return Response(*rest.handle(request.method, request.path, body))


def make_http_server(host: str, port: int, rest: RestApi, workers: int = 8, read_timeout: float = 30.0,
                     idle_timeout: float = 60.0, max_connections: int = 1024) -> HttpServer:
    """The REST API on (host, port): an I/O thread and `workers` threads (serving.devserver.http)."""
    limit = rest.api.max_request_bytes
    return HttpServer(host, port, lambda request: respond(rest, request), workers=workers, max_body_bytes=limit,
                      oversize=lambda size: {"error": too_large(size, limit).message}, drain_limit=DRAIN_LIMIT,
                      read_timeout=read_timeout, idle_timeout=idle_timeout, max_connections=max_connections)
