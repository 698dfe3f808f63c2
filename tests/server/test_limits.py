"""Bounded everything: body bytes in flight, slow bodies, slow headers, connections, bad HTTP.

Driven with raw sockets, as a hostile client would: the HTTP library of a test must not be what
keeps the server honest.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from support.servers import running
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.middleware import SigningMiddleware
from tee_inference.services import Services
from tee_inference.transport import uvicorn_options

MODEL = "fake-model"


@contextmanager
def serve(**config: object) -> Iterator[tuple[str, int, Services]]:
    cfg = ServerConfig.build(served_models=(MODEL,), **config)
    services = boot(cfg)
    with running(SigningMiddleware(FakeEngine(MODEL), services=services), **uvicorn_options(cfg)) as url:
        yield url, int(url.rsplit(":", 1)[1]), services


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _head(length: int, path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n\r\n").encode()  # fmt: skip


def _read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Reads one whole response (content-length framed) or until the peer closes."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _assert_envelope(status: int, headers: dict[str, str], body: bytes, want: int, code: str) -> dict:  # type: ignore[type-arg]
    assert status == want, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["status"] == want and error["code"] == code, error
    return error  # type: ignore[no-any-return]


def _closed(sock: socket.socket, timeout: float = 5) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _survives(sock: socket.socket, pieces: list[bytes], pause: float) -> bool:
    """Sends `pieces` one by one; False as soon as the server has closed the connection."""
    for piece in pieces:
        try:
            sock.sendall(piece)
        except OSError:
            return False
        time.sleep(pause)
    sock.settimeout(0.01)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


def test_a_slow_body_gets_a_408_and_the_connection_closes() -> None:
    with serve(body_timeout_s=1.0) as (_, port, _services):
        sock = _connect(port)
        started = time.monotonic()
        sock.sendall(_head(100) + b'{"model": ')
        status, headers, body = _read_response(sock)
        _assert_envelope(status, headers, body, 408, "request_timeout")
        assert time.monotonic() - started < 4
        assert headers.get("connection") == "close"
        assert _closed(sock)


def test_one_byte_every_half_second_does_not_keep_a_request_open() -> None:
    with serve(body_timeout_s=1.5) as (_, port, _services):
        sock = _connect(port)
        started = time.monotonic()
        sock.sendall(_head(1000))
        assert not _survives(sock, [b" "] * 20, pause=0.5)
        assert time.monotonic() - started < 5


def test_bytes_in_flight_are_bounded_across_connections() -> None:
    with serve(max_request_bytes=40_000, max_inflight_request_bytes=100_000, body_timeout_s=3.0) as (
        url,
        port,
        services,
    ):
        holders = [_connect(port), _connect(port)]
        for sock in holders:
            sock.sendall(_head(40_000) + b" " * 39_000)
        time.sleep(0.3)
        third = _connect(port)
        third.sendall(_head(40_000) + b" " * 30_000)
        status, headers, body = _read_response(third)
        _assert_envelope(status, headers, body, 429, "server_busy")
        assert headers["retry-after"].isdigit()
        # The held bodies time out and give their bytes back: serving goes on.
        for sock in holders:
            status, headers, body = _read_response(sock)
            _assert_envelope(status, headers, body, 408, "request_timeout")
        deadline = time.monotonic() + 2
        while services.admission.inflight_body_bytes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert services.admission.inflight_body_bytes == 0
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 200


def test_slow_headers_get_a_408_envelope() -> None:
    with serve(headers_timeout_s=1.0) as (_, port, _services):
        sock = _connect(port)
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n")
        status, headers, body = _read_response(sock)
        _assert_envelope(status, headers, body, 408, "request_timeout")
        assert time.monotonic() - started < 4
        assert _closed(sock)
        idle = _connect(port)  # says nothing at all: closed without an answer
        assert _closed(idle, timeout=4)


def test_trickled_headers_after_a_keep_alive_request_are_bounded_too() -> None:
    with serve(headers_timeout_s=1.0, keep_alive_timeout_s=1.0) as (_, port, _services):
        sock = _connect(port)
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        assert _read_response(sock)[0] == 200
        started = time.monotonic()
        trickle = [bytes([b]) for b in b"GET /health HTTP/1.1\r\nx-pad: " + b"a" * 40]
        assert not _survives(sock, trickle, pause=0.1)
        assert time.monotonic() - started < 4.5


def test_connections_over_the_cap_get_a_503_envelope() -> None:
    with serve(max_connections=3, headers_timeout_s=10.0) as (url, port, _services):
        held = [_connect(port) for _ in range(3)]
        time.sleep(0.2)
        extra = _connect(port)
        status, headers, body = _read_response(extra)
        _assert_envelope(status, headers, body, 503, "too_many_connections")
        assert headers["retry-after"].isdigit() and "x-should-retry" not in headers
        held.pop().close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 200
        for sock in held:
            sock.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nhost b\r\n\r\n",
        b"GET /health HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 300_000 + b"\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: abc\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
    ],
)
def test_transport_level_errors_are_envelopes(raw: bytes) -> None:
    with serve() as (_, port, _services):
        sock = _connect(port)
        sock.sendall(raw)
        status, headers, body = _read_response(sock)
        error = _assert_envelope(status, headers, body, 400, "invalid_http")
        assert headers["x-should-retry"] == "false"
        assert "Invalid HTTP request" not in error["message"] or error["type"] == "invalid_request_error"
        assert _closed(sock)


def test_json_nested_100000_deep_is_a_400() -> None:
    with serve() as (url, _, _services):
        r = httpx.post(f"{url}/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
