"""The stand-in's HTTP layer under load and faults, with a trivial handler (no model):
stalled connections cost no threads, a real listen backlog, one log line per client that
goes away, timeouts, keep-alive, chunked bodies and the body cap.

Each server here runs in this process, so its threads can be counted and its log read."""
from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
import weakref

import pytest
import requests

from serving.devserver.http import BACKLOG, HttpServer, Request, Response

WORKERS = 4


class Served:
    """An HttpServer on a free loopback port answering {"path", "body"} (or as `handler` says)."""

    def __init__(self, handler=None, serve=True, **options):
        self.requests: list[Request] = []

        def echo(request: Request) -> Response:
            self.requests.append(request)
            if handler is not None:
                return handler(request)
            return Response(200, {"path": request.path, "body": request.body.decode("latin-1")})

        options = {"workers": WORKERS, "max_body_bytes": 1 << 16, "oversize": lambda n: {"error": f"{n} too big"},
                   **options}
        self.server = HttpServer("127.0.0.1", 0, echo, **options)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        if serve:
            self.thread.start()

    def close(self):
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def served():
    servers = []

    def make(handler=None, **options):
        servers.append(Served(handler, **options))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed or killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


_UNREAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # socket -> bytes past the last answer


def _read_answer(sock: socket.socket) -> bytes:
    """The next whole answer on `sock` (head and Content-Length body). Bytes of a following
    answer that arrived in the same recv (pipelining: the server may write the second answer
    before the first is read) are kept for the next call."""
    data = _UNREAD.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0])
    while len(body) < length:
        body += sock.recv(65536)
    if len(body) > length:
        _UNREAD[sock] = body[length:]
    return head + b"\r\n\r\n" + body[:length]


def test_stalled_connections_cost_no_threads_and_a_request_still_succeeds(served):
    """300 connections that send nothing or half a request hold no thread (the old server:
    one thread each), and a normal request is answered meanwhile."""
    server = served(read_timeout=60)
    requests.get(f"{server.url}/warm", timeout=10)  # start the pool's threads
    before = threading.active_count()
    stalled = []
    for i in range(300):
        sock = _connect(server.port)
        if i % 2:
            sock.sendall(b"POST /v1/models/mdmt:predict HTTP/1.1\r\nContent-Length: 100\r\n")  # half a header
        stalled.append(sock)
    try:
        deadline = time.monotonic() + 10
        while server.server.open_connections() < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.server.open_connections() >= 300
        assert threading.active_count() <= before + WORKERS, "threads grew with the stalled connections"
        reply = requests.get(f"{server.url}/v1/models/mdmt", timeout=10)
        assert reply.status_code == 200 and reply.json()["path"] == "/v1/models/mdmt"
        assert threading.active_count() <= before + WORKERS
    finally:
        for sock in stalled:
            sock.close()


def test_listen_backlog_holds_a_burst_while_the_server_is_busy(served):
    """Connections complete in the kernel's backlog even before the server accepts them: a
    burst of 100 connects all succeed at once (a backlog of 5 drops SYNs, and the clients
    wait for TCP's 1 s retransmission)."""
    server = served(serve=False)
    assert BACKLOG >= 128
    sockets = []
    try:
        for _ in range(100):
            sock = socket.socket()
            sock.settimeout(0.5)  # far less than TCP's 1 s SYN retransmission
            sock.connect(("127.0.0.1", server.port))
            sockets.append(sock)
        server.thread.start()
        sockets[-1].sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
        sockets[-1].settimeout(10)
        assert b'"/late"' in _read_answer(sockets[-1])
    finally:
        for sock in sockets:
            sock.close()


def _serving_records(caplog):
    return [r for r in caplog.records if r.name == "serving"]


def test_client_disconnect_mid_request_is_one_log_line(served, caplog, capfd):
    server = served()
    with caplog.at_level(logging.INFO, logger="serving"):
        sock = _connect(server.port)
        sock.sendall(b"POST /v1/models/mdmt:predict HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        time.sleep(0.2)
        _reset(sock)
        deadline = time.monotonic() + 10
        while not _serving_records(caplog) and time.monotonic() < deadline:
            time.sleep(0.05)
    records = _serving_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "disconnected in the middle of a request" in records[0].getMessage()
    assert records[0].exc_info is None and "Traceback" not in capfd.readouterr().err
    assert not server.requests, "a truncated request is never handled"


def test_client_disconnect_before_the_answer_is_one_log_line(served, caplog, capfd):
    release = threading.Event()

    def slow(request):
        release.wait(10)
        return Response(200, {"pad": "x" * 200_000})  # more than one send() can take after a reset

    server = served(handler=slow)
    with caplog.at_level(logging.INFO, logger="serving"):
        sock = _connect(server.port)
        sock.sendall(b"GET /v1/models/mdmt HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 10
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        _reset(sock)
        release.set()
        while not _serving_records(caplog) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # nothing more is logged
    records = _serving_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "disconnected before its answer was sent" in records[0].getMessage()
    assert records[0].exc_info is None and "Traceback" not in capfd.readouterr().err
    assert requests.get(f"{server.url}/after", timeout=10).status_code == 200


def test_incomplete_requests_and_idle_connections_time_out(served, caplog):
    server = served(read_timeout=0.5, idle_timeout=0.5)
    with caplog.at_level(logging.INFO, logger="serving"):
        partial, idle = _connect(server.port), _connect(server.port)
        partial.sendall(b"GET /v1/models/mdmt HTTP/1.1\r\n")
        assert partial.recv(100) == b"" and idle.recv(100) == b"", "both closed by the server"
    messages = [r.getMessage() for r in _serving_records(caplog)]
    assert len(messages) == 1 and "request incomplete after" in messages[0], messages
    assert server.server.open_connections() == 0


def test_keep_alive_pipelining_chunked_and_expect_continue(served):
    server = served()
    sock = _connect(server.port)
    sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b'"/a"' in _read_answer(sock) and b'"/b"' in _read_answer(sock)
    sock.sendall(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n")
    answer = _read_answer(sock)
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"path": "/c", "body": "abcde"}
    sock.sendall(b"POST /d HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(b"xyz")
    assert b'"xyz"' in _read_answer(sock)
    sock.close()
    reply = requests.post(f"{server.url}/e", data=(part for part in [b"gen", b"erated"]), timeout=10)
    assert reply.json() == {"path": "/e", "body": "generated"}


def test_oversized_bodies_are_drained_and_refused(served):
    server = served(max_body_bytes=1000, drain_limit=10_000)
    sock = _connect(server.port)
    sock.sendall(b"POST /big HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
    answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b"5000 too big" in answer
    sock.sendall(b"GET /same-connection HTTP/1.1\r\nHost: x\r\n\r\n")  # drained: still usable
    assert b'"/same-connection"' in _read_answer(sock)
    sock.sendall(b"POST /huge HTTP/1.1\r\nContent-Length: 50000\r\n\r\n")  # beyond the drain limit
    answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b"Connection: close" in answer and sock.recv(10) == b""
    reply = requests.post(f"{server.url}/chunked", data=(b"y" * 600 for _ in range(3)), timeout=10)
    assert reply.status_code == 400 and reply.json() == {"error": "1800 too big"}
    assert all(r.path not in ("/big", "/huge", "/chunked") for r in server.requests)


@pytest.mark.parametrize("raw,words", [
    (b"GARBAGE\r\n\r\n", "Bad request syntax"),
    (b"POST /x HTTP/1.1\r\nContent-Length: ten\r\n\r\n", "bad Content-Length header"),
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunked body"),
    (b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n", "malformed header line"),
])
def test_malformed_requests_get_400_and_close(served, raw, words):
    server = served()
    sock = _connect(server.port)
    sock.sendall(raw)
    answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 400") and words.encode() in answer and sock.recv(10) == b""


def test_max_connections_closes_the_longest_idle(served):
    server = served(max_connections=3)
    first, *others = [_connect(server.port) for _ in range(3)]
    time.sleep(0.2)
    newest = _connect(server.port)
    assert first.recv(10) == b"", "the longest-idle connection made room"
    newest.sendall(b"GET /n HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b'"/n"' in _read_answer(newest)
    for sock in (newest, *others):
        sock.close()


def test_a_handler_bug_is_a_500_not_a_dead_connection(served, caplog):
    def broken(request):
        raise RuntimeError("bug")

    server = served(handler=broken)
    with caplog.at_level(logging.ERROR, logger="serving"):
        reply = requests.get(f"{server.url}/x", timeout=10)
    assert reply.status_code == 500 and "RuntimeError: bug" in reply.json()["error"]
