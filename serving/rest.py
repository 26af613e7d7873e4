"""TF Serving's REST API over the standard library's threading HTTP server.

Routes (TF Serving's regular expressions; names and labels are URL-decoded):
  GET  /v1/models/NAME[/versions/N | /labels/L][/metadata]   status / metadata
  POST /v1/models/NAME[/versions/N | /labels/L]:predict      predict
Anything else under /v1/ is TF Serving's 400 "Malformed request: METHOD PATH"; other paths
404. Errors are `{"error": "<message>"}` with TF Serving's HTTP status for the canonical
code (serving.status). :classify and :regress answer 501: this server implements predict.

The body is read with a size limit: an oversized one is drained (so the client sees the
answer instead of a reset connection) up to DRAIN_LIMIT and refused with 400.
"""
from __future__ import annotations

import json
import logging
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from google.protobuf import json_format

from serving import rest_codec
from serving.api import SIGNATURE_DEF, ModelApi, ModelRequest, too_large
from serving.status import StatusError, invalid

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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mdmt-dev-model-server"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def do_GET(self):
        self._serve(b"")

    def do_POST(self):
        body = self._read_body()
        if body is not None:
            self._serve(body)

    def do_PUT(self):
        self._read_body()
        self._reply(*self.server.rest.handle(self.command, self.path, b""))

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def do_HEAD(self):  # no body may follow a HEAD answer: status only
        self.send_response(400 if self.path.lower().startswith("/v1/") else 404)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()

    def _serve(self, body: bytes) -> None:
        if not self.path.split("?", 1)[0].lower().startswith("/v1/"):
            self._reply(404, {"error": f"Not found: {self.path.split('?', 1)[0]} (the API lives under /v1/models)"})
            return
        self._reply(*self.server.rest.handle(self.command, self.path, body))

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering an oversized / unreadable one."""
        limit = self.server.rest.api.max_request_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._reply(400, {"error": f"bad Content-Length header {self.headers.get('Content-Length')!r}"}, close=True)
            return None
        if length > limit:
            self._refuse(length, drain=length)
            return None
        return self.rfile.read(max(length, 0))

    def _read_chunked(self, limit: int) -> bytes | None:
        parts, size = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                chunk = int(line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                self._reply(400, {"error": f"malformed chunked body: chunk size line {line[:40]!r}"}, close=True)
                return None
            if chunk == 0:
                self.rfile.readline(1024)
                return b"".join(parts)
            size += chunk
            if size > limit:
                self._refuse(size, drain=0)
                return None
            parts.append(self.rfile.read(chunk))
            self.rfile.readline(1024)

    def _refuse(self, size: int, drain: int) -> None:
        message = {"error": too_large(size, self.server.rest.api.max_request_bytes).message}
        if 0 < drain <= DRAIN_LIMIT:
            while drain > 0:
                chunk = self.rfile.read(min(drain, 1 << 20))
                if not chunk:
                    break
                drain -= len(chunk)
            self._reply(400, message)
        else:
            self._reply(400, message, close=True)

    def _reply(self, status: int, doc: dict, close: bool = False) -> None:
        payload = json.dumps(doc, indent=None, allow_nan=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        log.debug("%s %s", self.address_string(), format % args)


def make_http_server(host: str, port: int, rest: RestApi) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    server.rest = rest
    return server
