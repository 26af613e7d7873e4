"""The stand-in's HTTP/1.1 server: one I/O thread, a fixed pool of workers.

The I/O thread accepts connections (listen backlog BACKLOG) and reads each request
completely, request line, headers and body (Content-Length or chunked), without blocking.
Only a complete request goes to a worker of the pool (`workers` threads); the worker's
answer is written back by the I/O thread. So a connection that sends nothing, or half a
request, costs a file descriptor and a buffer, never a thread:

  idle_timeout   a keep-alive connection with no request in progress is closed after it;
  read_timeout   a request that has not fully arrived this long after its first byte is
                 dropped (one log line); so is an answer the client does not read within it;
  max_connections  beyond it the longest-idle connection is closed (or the new one, when
                 every connection is busy).

A body over `max_body_bytes` is refused with `oversize(size)` (a JSON document, HTTP 400):
the body is read and discarded first, up to `drain_limit` bytes, so the client sees the
answer rather than a reset connection; beyond that the connection is closed after answering.
A client that goes away is one INFO log line, never a traceback.
"""
from __future__ import annotations

import collections
import dataclasses
import email.utils
import errno
import json
import logging
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Callable

log = logging.getLogger("serving")

BACKLOG = 128
MAX_HEAD_BYTES = 64 << 10          # request line + headers
MAX_CHUNK_LINE = 1024
RECV_BYTES = 1 << 18
TICK_SECONDS = 0.25                # how often timeouts are checked
SERVER_NAME = "mdmt-dev-model-server"

# connection states
IDLE, READING, BUSY, WRITING = "idle", "reading", "busy", "writing"
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]     # lower-case names
    body: bytes


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    doc: dict | None            # JSON body; None: no body (HEAD)
    close: bool = False


Handler = Callable[[Request], Response]


class _BadRequest(Exception):
    """A request the server cannot frame: answered with 400 and the connection closed."""


class _Conn:
    """One client connection and the request being read on it."""

    def __init__(self, sock: socket.socket, address, now: float):
        self.sock, self.address = sock, address
        self.peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.inbuf = bytearray()
        self.out = memoryview(b"")
        self.close_after_write = False
        self.state = IDLE
        self.since = now                # when the current state (or request) began
        self.keep_alive = True
        self.closed = False
        self._reset_request()

    def _reset_request(self) -> None:
        self.head: tuple[str, str, str, dict] | None = None   # method, path, version, headers
        self.body = bytearray()
        self.need = 0                   # body bytes still expected (Content-Length framing)
        self.chunked = False
        self.chunk_phase = "size"       # size | data | trailer
        self.body_size = 0
        self.oversize: int | None = None  # the refused body's size: body bytes are discarded

    def next_request(self, now: float) -> None:
        self._reset_request()
        self.state, self.since = IDLE, now


class HttpServer:
    """`handler(Request) -> Response` served on (host, port); see the module doc."""

    def __init__(self, host: str, port: int, handler: Handler, *, workers: int = 8, max_body_bytes: int,
                 oversize: Callable[[int], dict], drain_limit: int = 256 << 20, read_timeout: float = 30.0,
                 idle_timeout: float = 60.0, max_connections: int = 1024, backlog: int = BACKLOG):
        self.handler, self.oversize = handler, oversize
        self.max_body_bytes, self.drain_limit = max_body_bytes, drain_limit
        self.read_timeout, self.idle_timeout, self.max_connections = read_timeout, idle_timeout, max_connections
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(backlog)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.server_address = self._listener.getsockname()[:2]
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rest")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._done: collections.deque = collections.deque()     # (conn, Response) from workers
        self._conns: dict[socket.socket, _Conn] = {}
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._running = False

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        self._running = True
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                for key, mask in self._selector.select(TICK_SECONDS):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        conn = key.data
                        if conn.closed:
                            continue
                        if mask & selectors.EVENT_READ and conn.state in (IDLE, READING):
                            self._read(conn)
                        if mask & selectors.EVENT_WRITE and conn.state == WRITING:
                            self._write(conn)
                self._answer_done()
                self._expire(time.monotonic())
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and wait for it."""
        self._stop.set()
        self._wake()
        if self._running:
            self._stopped.wait(10)

    def server_close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def open_connections(self) -> int:
        return len(self._conns)

    # ---------------------------------------------------------------- accept
    def _accept(self) -> None:
        for _ in range(BACKLOG):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # e.g. EMFILE: leave the rest in the backlog for now
                log.warning("cannot accept a connection: %s", err)
                return
            if len(self._conns) >= self.max_connections and not self._evict_idle():
                log.info("refused a connection from %s: %d connections open (the limit)",
                         address[0], len(self._conns))
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, address, time.monotonic())
            self._conns[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict_idle(self) -> bool:
        idle = [c for c in self._conns.values() if c.state == IDLE and not c.inbuf]
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.since))
        return True

    # ------------------------------------------------------------------ read
    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._gone(conn, err)
            return
        if not data:
            self._gone(conn, None)
            return
        if conn.state == IDLE:
            conn.state, conn.since = READING, time.monotonic()
        conn.inbuf += data
        self._parse(conn)

    def _parse(self, conn: _Conn) -> None:
        """Advance the request on `conn` with the bytes in its buffer; dispatch it when complete."""
        try:
            if conn.head is None and not self._parse_head(conn):
                return
            if not (self._parse_chunked(conn) if conn.chunked else self._parse_body(conn)):
                return
        except _BadRequest as err:
            self._respond(conn, Response(400, {"error": str(err)}, close=True))
            return
        method, path, _, headers = conn.head
        if conn.oversize is not None:
            self._respond(conn, Response(400, self.oversize(conn.oversize)))
            return
        request = Request(method, path, headers, bytes(conn.body))
        conn.state = BUSY
        self._selector.unregister(conn.sock)
        self._pool.submit(self._work, conn, request)

    def _parse_head(self, conn: _Conn) -> bool:
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > MAX_HEAD_BYTES:
                raise _BadRequest(f"request line and headers exceed {MAX_HEAD_BYTES} bytes")
            return False
        lines = bytes(conn.inbuf[:end]).decode("latin-1").split("\r\n")
        del conn.inbuf[:end + 4]
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest(f"Bad request syntax ({lines[0][:100]!r})")
        method, path, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise _BadRequest(f"malformed header line {line[:100]!r}")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        connection = headers.get("connection", "").lower()
        conn.keep_alive = ("close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection)
        conn.head = (method, path, version, headers)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            conn.chunked = True
        else:
            try:
                conn.need = int(headers.get("content-length") or 0)
                if conn.need < 0:
                    raise ValueError
            except ValueError:
                raise _BadRequest(f"bad Content-Length header {headers.get('content-length')!r}") from None
            if conn.need > self.max_body_bytes:
                conn.oversize = conn.need
                if conn.need > self.drain_limit:  # too much to read: answer now, then close
                    conn.need, conn.keep_alive = 0, False
        if headers.get("expect", "").lower() == "100-continue" and version == "HTTP/1.1":
            if conn.oversize is not None:  # the client has not sent the body: no need to read it
                conn.need, conn.keep_alive = 0, False
            else:
                self._send_now(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _parse_body(self, conn: _Conn) -> bool:
        take = min(conn.need, len(conn.inbuf))
        if conn.oversize is None:
            conn.body += conn.inbuf[:take]
        del conn.inbuf[:take]
        conn.need -= take
        return conn.need == 0

    def _parse_chunked(self, conn: _Conn) -> bool:
        buf = conn.inbuf
        while True:
            if conn.chunk_phase == "data":
                if len(buf) < conn.need + 2:
                    if conn.oversize is not None and conn.need > 0:  # discard as it arrives
                        take = min(conn.need, len(buf))
                        del buf[:take]
                        conn.need -= take
                    return False
                if conn.oversize is None:
                    conn.body += buf[:conn.need]
                del buf[:conn.need + 2]
                conn.chunk_phase, conn.need = "size", 0
                continue
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    raise _BadRequest(f"malformed chunked body: chunk size line {bytes(buf[:40])!r}")
                return False
            line = bytes(buf[:end]).rstrip(b"\r")
            del buf[:end + 1]
            if conn.chunk_phase == "trailer":
                if not line:
                    return True
                continue
            try:
                size = int(line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                raise _BadRequest(f"malformed chunked body: chunk size line {line[:40]!r}") from None
            if size == 0:
                conn.chunk_phase = "trailer"
                continue
            conn.body_size += size
            if conn.body_size > self.max_body_bytes and conn.oversize is None:
                conn.oversize, conn.body = conn.body_size, bytearray()
            if conn.oversize is not None:
                conn.oversize = conn.body_size
                if conn.body_size > self.drain_limit:  # stop reading: answer now, then close
                    conn.keep_alive = False
                    return True
            conn.chunk_phase, conn.need = "data", size

    # ---------------------------------------------------------------- workers
    def _work(self, conn: _Conn, request: Request) -> None:
        try:
            response = self.handler(request)
        except Exception as err:  # a bug in the handler; never the client's fault
            log.exception("internal error on %s %s", request.method, request.path)
            response = Response(500, {"error": f"Internal error: {type(err).__name__}: {err}"})
        self._done.append((conn, response))
        self._wake()

    def _answer_done(self) -> None:
        while self._done:
            conn, response = self._done.popleft()
            if conn.closed:
                continue
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            self._respond(conn, response)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already (or the server is closing)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # ----------------------------------------------------------------- write
    def _respond(self, conn: _Conn, response: Response) -> None:
        head_only = conn.head is not None and conn.head[0] == "HEAD"
        close = response.close or not conn.keep_alive
        payload = b"" if response.doc is None or head_only else json.dumps(response.doc, allow_nan=True).encode()
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = ""
        lines = [f"HTTP/1.1 {response.status} {reason}", f"Server: {SERVER_NAME}",
                 f"Date: {email.utils.formatdate(usegmt=True)}"]
        if response.doc is not None:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(payload) if not head_only else 0}")
        if close:
            lines.append("Connection: close")
        conn.out = memoryview(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
        conn.close_after_write = close
        conn.state, conn.since = WRITING, time.monotonic()
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
                return
            except OSError as err:
                self._gone(conn, err)
                return
            conn.out = conn.out[sent:]
        if conn.close_after_write:
            self._close(conn)
            return
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
        conn.next_request(time.monotonic())
        if conn.inbuf:  # a pipelined request arrived with the last one
            conn.state = READING
            self._parse(conn)

    def _send_now(self, conn: _Conn, data: bytes) -> None:
        try:
            conn.sock.send(data)
        except OSError:
            pass  # the client is gone; the next read notices

    # ------------------------------------------------------------- lifecycle
    def _expire(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.state == IDLE and now - conn.since > self.idle_timeout:
                log.debug("closed idle connection from %s", conn.peer)
                self._close(conn)
            elif conn.state == READING and now - conn.since > self.read_timeout:
                log.info("closed connection from %s: request incomplete after %.0f s (%d bytes received)",
                         conn.peer, self.read_timeout, len(conn.inbuf) + len(conn.body))
                self._close(conn)
            elif conn.state == WRITING and now - conn.since > self.read_timeout:
                log.info("closed connection from %s: the client did not read its answer within %.0f s",
                         conn.peer, self.read_timeout)
                self._close(conn)

    def _gone(self, conn: _Conn, err: OSError | None) -> None:
        """The client closed or reset the connection: one line if it left a request behind."""
        if conn.state == READING:
            log.info("client %s disconnected in the middle of a request", conn.peer)
        elif conn.state == WRITING:
            why = errno.errorcode.get(err.errno, str(err)) if err is not None and err.errno else "closed"
            log.info("client %s disconnected before its answer was sent (%s)", conn.peer, why)
        elif err is not None and not isinstance(err, _GONE):
            log.info("connection from %s failed: %s", conn.peer, err)
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.sock, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
