"""A DEVELOPMENT STAND-IN for tensorflow_model_server, for machines without it.

Production serves with TF Serving (the tensorflow/serving image; serving/README.md). This
server exists so that a laptop or CI machine without that binary or Docker can run the
same clients against the same API: it loads the newest numbered version under
--model-base-path, polls for new versions and switches to them without a restart, and
speaks TF Serving's REST API (port 8501) and gRPC PredictionService / ModelService
(port 8500) with TF Serving's response and error shapes. It is pure Python on top of
TensorFlow: no cross-request batching, no multi-model config, no Prometheus endpoint.

Under load and faults it stays within bounds: a request is capped in bytes
(--max-request-bytes) and rows (--max-request-rows) and scored in slices of at most
--score-batch-rows rows; REST connections are served by one I/O thread and a pool of
--rest-workers threads (gRPC: --grpc-workers), with a listen backlog of 128 and read and
idle timeouts, so stalled clients cost no threads (http.py); a client that disconnects is
one log line.

    python -m serving.devserver --model-base-path DIR [--model-name mdmt]
    mdmt serve --model-base-path DIR          (the same, from the mdmt CLI)
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path

from mdmt_tf.errors import ConfigError, MdmtError

log = logging.getLogger("serving")

PRODUCTION_IMAGE = "tensorflow/serving:2.21.0"
STAND_IN = ("DEVELOPMENT STAND-IN for tensorflow_model_server (REST + gRPC, TF Serving's API) for machines "
            f"without it; production serves with TF Serving ({PRODUCTION_IMAGE}, see serving/README.md)")
DEFAULT_MAX_REQUEST_BYTES = 64 << 20
DEFAULT_MAX_REQUEST_ROWS = 65_536
DEFAULT_SCORE_BATCH_ROWS = 4096  # serving/config/batching.config's max_batch_size


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    model_base_path: Path
    model_name: str = "mdmt"
    host: str = "127.0.0.1"
    rest_port: int = 8501
    grpc_port: int = 8500
    poll_seconds: float = 2.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_request_rows: int = DEFAULT_MAX_REQUEST_ROWS
    score_batch_rows: int = DEFAULT_SCORE_BATCH_ROWS
    num_versions: int = 1
    labels: tuple[tuple[str, int], ...] = ()
    warmup: bool = True
    rest_workers: int = 8
    grpc_workers: int = 8
    read_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_connections: int = 1024
    max_load_retries: int = 5
    load_retry_seconds: float = 60.0

    def __post_init__(self):
        checks = [
            (Path(self.model_base_path).is_dir(), f"--model-base-path {self.model_base_path} is not a directory; "
                                                  "publish a model there with `mdmt export --model-dir DIR --base-path "
                                                  f"{self.model_base_path}`"),
            (self.poll_seconds > 0, f"--poll-seconds must be > 0, got {self.poll_seconds}"),
            (self.max_request_bytes >= 1024, f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}"),
            (self.max_request_rows >= 1, f"--max-request-rows must be >= 1, got {self.max_request_rows}"),
            (self.score_batch_rows >= 1, f"--score-batch-rows must be >= 1, got {self.score_batch_rows}"),
            (self.rest_workers >= 1 and self.grpc_workers >= 1, "--rest-workers and --grpc-workers must be >= 1"),
            (self.read_timeout > 0 and self.idle_timeout > 0, "--read-timeout and --idle-timeout must be > 0"),
            (self.max_connections >= 1, f"--max-connections must be >= 1, got {self.max_connections}"),
            (self.max_load_retries >= 0 and self.load_retry_seconds >= 0,
             "--max-load-retries and --load-retry-seconds must be >= 0"),
            (self.num_versions >= 1, f"--num-versions must be >= 1, got {self.num_versions}"),
            (all(0 <= p <= 65535 for p in (self.rest_port, self.grpc_port)), "ports must be in 0..65535"),
            (bool(self.model_name) and "/" not in self.model_name and ":" not in self.model_name,
             f"--model-name must be non-empty without '/' or ':', got {self.model_name!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def load_servable(name: str, version: int, path: Path, warmup: bool = True,
                  batch_rows: int = DEFAULT_SCORE_BATCH_ROWS):
    from .servable import Servable

    servable = Servable(name, version, path, batch_rows=batch_rows)
    if warmup:
        count = servable.warm_up()
        if count:
            log.info("%s version %d: replayed %d warmup requests", name, version, count)
    return servable


class LocalServer:
    """The dev server's pieces (repository, REST, gRPC) started and stopped together."""

    def __init__(self, options: ServerOptions):
        from .api import ModelApi
        from .repository import ModelRepository

        self.options = options
        self.repository = ModelRepository(
            options.model_name, options.model_base_path, num_versions=options.num_versions,
            labels=dict(options.labels), max_load_retries=options.max_load_retries,
            load_retry_seconds=options.load_retry_seconds,
            load=lambda n, v, p: load_servable(n, v, p, options.warmup, options.score_batch_rows))
        self.api = ModelApi(self.repository, options.max_request_bytes, options.max_request_rows)
        self._http = self._grpc = None
        self.rest_port = self.grpc_port = None

    def start(self) -> "LocalServer":
        from .grpc_service import make_grpc_server
        from .rest import RestApi, make_http_server

        o = self.options
        log.warning(STAND_IN)
        self.repository.start(o.poll_seconds)  # the first poll loads before the ports open, as TF Serving
        if not self.repository.available_versions():
            log.warning("no loadable version under %s yet; polling every %s s", o.model_base_path, o.poll_seconds)
        self._grpc, self.grpc_port = make_grpc_server(o.host, o.grpc_port, self.api, workers=o.grpc_workers)
        try:
            self._http = make_http_server(o.host, o.rest_port, RestApi(self.api), workers=o.rest_workers,
                                          read_timeout=o.read_timeout, idle_timeout=o.idle_timeout,
                                          max_connections=o.max_connections)
        except OSError as err:
            self._grpc.stop(0)
            raise ConfigError(f"cannot bind the REST port {o.host}:{o.rest_port}: {err}") from None
        self.rest_port = self._http.server_address[1]
        self._grpc.start()
        threading.Thread(target=self._http.serve_forever, name="rest", daemon=True).start()
        log.warning("serving model %r from %s: REST http://%s:%d, gRPC %s:%d", o.model_name, o.model_base_path,
                    o.host, self.rest_port, o.host, self.grpc_port)
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait()
        self.repository.stop()


# ----------------------------------------------------------------------- command line
def _label(text: str) -> tuple[str, int]:
    label, sep, version = text.partition("=")
    if not sep or not label or not version.isdigit() or int(version) < 1:
        raise argparse.ArgumentTypeError(f"expected LABEL=VERSION with VERSION >= 1, got {text!r}")
    return label, int(version)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-base-path", required=True, help="directory of numbered SavedModel versions (1/, 2/, ...)")
    p.add_argument("--model-name", default="mdmt", help="the NAME in /v1/models/NAME and in gRPC model_spec.name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    p.add_argument("--rest-port", type=int, default=8501, help="REST port (0: any free port)")
    p.add_argument("--grpc-port", type=int, default=8500, help="gRPC port (0: any free port)")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="how often to look for new versions")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="larger requests are refused with 400 / INVALID_ARGUMENT")
    p.add_argument("--max-request-rows", type=int, default=DEFAULT_MAX_REQUEST_ROWS,
                   help="requests of more rows are refused with 400 / INVALID_ARGUMENT")
    p.add_argument("--score-batch-rows", type=int, default=DEFAULT_SCORE_BATCH_ROWS,
                   help="score a request in slices of at most this many rows (bounds memory)")
    p.add_argument("--num-versions", type=int, default=1,
                   help="keep the newest N versions loaded (TF Serving's `latest N` policy)")
    p.add_argument("--version-label", action="append", type=_label, default=[], metavar="LABEL=N",
                   help="serve version N under /labels/LABEL (repeatable)")
    p.add_argument("--no-warmup", action="store_true", help="skip assets.extra/tf_serving_warmup_requests")
    p.add_argument("--rest-workers", type=int, default=8, help="threads answering REST requests")
    p.add_argument("--grpc-workers", type=int, default=8, help="threads answering gRPC calls")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a REST request may take to arrive (and its answer to be read)")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds an idle keep-alive connection stays open")
    p.add_argument("--max-connections", type=int, default=1024, help="open REST connections at most")
    p.add_argument("--max-load-retries", type=int, default=5,
                   help="retry a version that failed to load this many times (TF Serving's --max_num_load_retries)")
    p.add_argument("--load-retry-seconds", type=float, default=60.0,
                   help="seconds between load retries (TF Serving's --load_retry_interval_micros)")


def options_from_args(args) -> ServerOptions:
    return ServerOptions(Path(args.model_base_path), model_name=args.model_name, host=args.host,
                         rest_port=args.rest_port, grpc_port=args.grpc_port, poll_seconds=args.poll_seconds,
                         max_request_bytes=args.max_request_bytes, max_request_rows=args.max_request_rows,
                         score_batch_rows=args.score_batch_rows, num_versions=args.num_versions,
                         labels=tuple(args.version_label), warmup=not args.no_warmup, rest_workers=args.rest_workers,
                         grpc_workers=args.grpc_workers, read_timeout=args.read_timeout,
                         idle_timeout=args.idle_timeout, max_connections=args.max_connections,
                         max_load_retries=args.max_load_retries, load_retry_seconds=args.load_retry_seconds)


def serve_forever(options: ServerOptions) -> int:
    """Start, then block until SIGINT / SIGTERM."""
    server = LocalServer(options).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.warning("shutting down")
    server.stop()
    return 0


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.devserver", description=STAND_IN + ".")
    add_server_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return serve_forever(options_from_args(args))
    except MdmtError as err:
        print(f"serving: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
