"""The HTTP transport's own limits, and its errors in the one envelope (for our uvicorn).

uvicorn answers a few things before any ASGI app sees a request: an unparseable request (its
plain-text "Invalid HTTP request received." 400), and, with `limit_concurrency`, a plain-text
503. It also has no bound on how long a request's headers may take to arrive (its keep-alive
timer runs only between requests, and a byte of data stops it), so a client that trickles
headers holds a connection forever. `guarded_protocol` closes those gaps in a small subclass
of uvicorn's protocol, httptools' where it is installed (the C parser vLLM's uvicorn uses too,
several times cheaper per request than the pure-Python h11, which remains the fallback):

- a connection over `max_connections` gets a 503 envelope (`too_many_connections`,
  `Retry-After: 1`) and is closed before anything is read;
- a request's headers must be complete `headers_timeout_s` after the connection opened (or
  `keep_alive_timeout_s + headers_timeout_s` after the previous response): else a 408 envelope
  if some bytes came, and the connection closes;
- an unparseable request, or headers over `max_header_bytes` (counted here: httptools has no
  such bound), get a 400 envelope (`invalid_http`) instead of uvicorn's text.

From the headers on, the middleware bounds the body (size, time, bytes in flight). Inside vLLM,
vLLM runs its own uvicorn and none of this applies; docs/api.md says what does there.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    _FASTEST: type[H11Protocol] | type[HttpToolsProtocol] = HttpToolsProtocol
except ImportError:  # httptools not installed: the pure-Python parser
    _FASTEST = H11Protocol

from tee_inference.config import ServerConfig
from tee_inference.envelope import error_body, error_headers


def raw_error_response(
    status: int, message: str, code: str, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    """A whole HTTP/1.1 error response in the envelope, for when no ASGI app is involved."""
    body = error_body(status, message, code=code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"connection", b"close"),
        *error_headers(status, code),
        *(extra_headers or []),
    ]
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode("ascii")
    return head + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body


def guarded_protocol(
    *,
    max_connections: int,
    headers_timeout_s: float,
    keep_alive_timeout_s: float,
    max_header_bytes: int,
    base: type[Any] = _FASTEST,
) -> type[Any]:
    """uvicorn's HTTP/1.1 protocol with a connection cap, a headers timeout and size, enveloped errors."""

    class GuardedProtocol(base):  # type: ignore[misc]
        _headers_timer: asyncio.TimerHandle | None = None
        _bytes_waiting = False  # some bytes of a next request arrived, its headers did not
        _header_bytes = 0  # bytes received since the last request's headers were complete

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(
                    raw_error_response(
                        503,
                        "too many connections; retry shortly",
                        "too_many_connections",
                        [(b"retry-after", b"1")],
                    )
                )
                transport.close()
                return
            self._arm(headers_timeout_s)

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:
                self._disarm()  # the headers are in: the middleware bounds the body
                self._header_bytes = 0
            elif self._between_requests() and not self.transport.is_closing():
                self._bytes_waiting = True
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self.send_400_response("request headers too large")
                    return
                if self._headers_timer is None:
                    self._arm(headers_timeout_s)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._bytes_waiting = False
            if not self.transport.is_closing():
                self._arm(keep_alive_timeout_s + headers_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            del msg  # uvicorn's text ("Invalid HTTP request received.") says no more than ours
            self.transport.write(raw_error_response(400, "invalid HTTP request", "invalid_http"))
            self.transport.close()

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._headers_timer = self.loop.call_later(seconds, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
                self._headers_timer = None

        def _headers_timed_out(self) -> None:
            self._headers_timer = None
            if not self._between_requests() or self.transport.is_closing():
                return
            if self._bytes_waiting:
                self.transport.write(
                    raw_error_response(408, "the request headers did not arrive in time", "request_timeout")
                )
            self.transport.close()

    return GuardedProtocol


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """The `uvicorn.Config` options that carry the configuration's transport limits."""
    return {
        "http": guarded_protocol(
            max_connections=config.max_connections,
            headers_timeout_s=config.headers_timeout_s,
            keep_alive_timeout_s=config.keep_alive_timeout_s,
            max_header_bytes=config.max_header_bytes,
        ),
        "timeout_keep_alive": config.keep_alive_timeout_s,
        "h11_max_incomplete_event_size": config.max_header_bytes,
    }
