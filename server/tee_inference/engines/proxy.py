"""The standalone front: a pure ASGI app that streams requests to an OpenAI-compatible engine.

It forwards bytes, never JSON: the body the engine receives is the body the client sent,
and the body the client receives is the body the engine produced, so the signing
middleware in front of this app hashes exactly what both ends saw.

Chosen by measurement (README, "Performance"): an aiohttp client session with pooled
keep-alive connections, behind a one-dictionary route table. On loopback against the same
engine it forwarded an order of magnitude more requests per second than FastAPI routing with
an httpx client, and than httpx or httpcore used directly from the same ASGI app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

import aiohttp
import anyio

from tee_inference.asgi import Receive, Scope, Send, read_body
from tee_inference.envelope import error_body

log = logging.getLogger("tee_inference.proxy")

# Response headers worth keeping from the engine; hop-by-hop and length headers are the
# ASGI server's business, and anything else is the engine's internals.
_KEPT_RESPONSE_HEADERS: Final = frozenset({"content-type", "x-request-id"})
# Never `x-request-id`: vLLM would build the completion id from it, and ids are the server's.
_FORWARDED_REQUEST_HEADERS: Final = frozenset({b"content-type", b"accept"})
_GET, _POST = frozenset({"GET"}), frozenset({"POST"})
# What is forwarded, by path; /health is answered from the engine's own health.
_ROUTES: Final = {
    "/v1/chat/completions": _POST,
    "/v1/completions": _POST,
    "/v1/models": _GET,
    "/version": _GET,
    "/metrics": _GET,
    "/health": _GET,
}


async def _send_envelope(send: Send, status: int, message: str, *, code: str | None = None) -> None:
    body = error_body(status, message, code=code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii"))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ProxyApp:
    """Forwards the OpenAI routes we serve to `upstream_url` over one pooled client session.

    Every wait on the engine is bounded: `request_timeout_s` for its model list, health, version
    and metrics; `response_timeout_s` until a completion's response headers (vLLM sends a
    non-streamed answer's headers only once it is complete). Past either: a 504 envelope. A
    completion's body has no timer: a long generation streams for minutes, and the client's
    disconnect, not a timer, ends it.
    """

    def __init__(
        self, upstream_url: str, *, request_timeout_s: float = 10.0, response_timeout_s: float = 900.0
    ):
        self.upstream_url = upstream_url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.response_timeout_s = response_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The pooled session, made in the serving loop on first use (or at lifespan start-up)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # Pool limits bound the connections we hold to the engine; idle ones are kept.
                connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_connect=10.0),
                # The bytes as the engine sent them: never decompressed, never re-encoded.
                auto_decompress=False,
                headers={"accept-encoding": "identity"},
                skip_auto_headers=("user-agent",),
            )
        return self._session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        methods = _ROUTES.get(scope["path"])
        if methods is None:
            await _send_envelope(send, 404, "Not Found")
        elif scope["method"] not in methods:
            await _send_envelope(send, 405, "Method Not Allowed")
        elif scope["path"] == "/health":
            await self._health(send)
        else:
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._session is not None:
                    await self._session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _health(self, send: Send) -> None:
        try:
            with anyio.fail_after(self.request_timeout_s):
                async with self.session().get(self.upstream_url + "/health") as response:
                    ok = response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            ok = False
        if ok:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await _send_envelope(send, 503, "the engine is not healthy")

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        completion = scope["method"] == "POST"
        body = await read_body(receive)
        if body is None:
            return  # the client left before its request body was read
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k in _FORWARDED_REQUEST_HEADERS
        }
        timeout = None if completion else aiohttp.ClientTimeout(total=self.request_timeout_s)
        try:
            with anyio.fail_after(self.response_timeout_s if completion else self.request_timeout_s * 2):
                response = await self.session().request(
                    scope["method"],
                    self.upstream_url + scope["path"],
                    data=body or None,  # aiohttp gives even an empty payload a content-type
                    headers=headers,
                    timeout=timeout,
                )
        except TimeoutError:
            log.error("engine at %s did not answer in time", self.upstream_url)
            await _send_envelope(send, 504, "the engine did not answer in time", code="engine_timeout")
            return
        except (aiohttp.ClientError, OSError) as exc:
            log.error("engine unreachable at %s: %s", self.upstream_url, type(exc).__name__)
            await _send_envelope(send, 502, "the engine is unreachable")
            return
        try:
            await _stream_response(response, receive, send)
        finally:
            response.release()


async def _stream_response(response: aiohttp.ClientResponse, receive: Receive, send: Send) -> None:
    """Streams an engine response to the client and drops it the moment the client leaves.

    Watching `receive` for `http.disconnect` (instead of waiting for a failed write) closes the
    engine connection at once, so vLLM aborts the generation and frees its KV cache. An engine
    that breaks off mid-body ends the response without its final message: the signing
    middleware then closes the stream with a signed error event.
    """
    finished = False

    async def watch_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not finished:  # after the last message a disconnect is just the end
            log.debug("client disconnected; closing the engine request")
            response.close()

    # One plain task, not a task group: it only ever waits, and it is cancelled when we finish.
    watcher = asyncio.get_running_loop().create_task(watch_disconnect())
    try:
        await send({"type": "http.response.start", "status": response.status, "headers": _kept(response)})
        try:
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, OSError) as exc:
            if not watcher.done():
                log.error("engine connection broke during a response: %s", type(exc).__name__)
            return
        if watcher.done():
            return  # the client left: the engine request was closed, the stream is not complete
        finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher


def _kept(response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in response.headers.items()
        if k.lower() in _KEPT_RESPONSE_HEADERS
    ]


def create_proxy_app(
    upstream_url: str, *, request_timeout_s: float = 10.0, response_timeout_s: float = 900.0
) -> ProxyApp:
    """The ASGI app forwarding the OpenAI routes we serve to `upstream_url`."""
    return ProxyApp(upstream_url, request_timeout_s=request_timeout_s, response_timeout_s=response_timeout_s)
