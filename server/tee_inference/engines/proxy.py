"""The standalone front: a FastAPI app that streams requests to an OpenAI-compatible engine.

It forwards bytes, never JSON: the body the engine receives is the body the client sent,
and the body the client receives is the body the engine produced, so the signing
middleware in front of this app hashes exactly what both ends saw.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from tee_inference.asgi import Receive, Scope, Send
from tee_inference.envelope import error_body

log = logging.getLogger("tee_inference.proxy")

# Response headers worth keeping from the engine; hop-by-hop and length headers are the
# ASGI server's business, and anything else is the engine's internals.
_KEPT_RESPONSE_HEADERS = frozenset({b"content-type", b"x-request-id"})
# Never `x-request-id`: vLLM would build the completion id from it, and ids are the server's.
_FORWARDED_REQUEST_HEADERS = frozenset({"content-type", "accept"})


class UpstreamResponse(Response):
    """Streams an engine response to the client and cancels it the moment the client leaves.

    Watching `receive` for `http.disconnect` (instead of waiting for a failed write) closes
    the engine connection at once, so vLLM aborts the generation and frees its KV cache. An
    engine that breaks off mid-body ends the response without its final message: the signing
    middleware then closes the stream with a signed error event.
    """

    def __init__(self, upstream: httpx.Response) -> None:
        # Not Response.__init__: the body is streamed from `upstream`, never rendered.
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (k.lower(), v) for k, v in self.upstream.headers.raw if k.lower() in _KEPT_RESPONSE_HEADERS
        ]
        finished = False
        try:
            async with anyio.create_task_group() as tasks:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not finished:  # after the last message a disconnect is just the end
                        log.debug("client disconnected; cancelling the engine request")
                    tasks.cancel_scope.cancel()

                tasks.start_soon(watch_disconnect)
                await send(
                    {"type": "http.response.start", "status": self.upstream.status_code, "headers": headers}
                )
                try:
                    async for chunk in self.upstream.aiter_raw():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except httpx.TransportError as exc:
                    log.error("engine connection broke during a response: %s", type(exc).__name__)
                    tasks.cancel_scope.cancel()
                    return
                finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tasks.cancel_scope.cancel()
        finally:
            await self.upstream.aclose()


def _envelope(status: int, message: str, *, code: str | None = None) -> Response:
    return Response(error_body(status, message, code=code), status_code=status, media_type="application/json")


def create_proxy_app(
    upstream_url: str,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    request_timeout_s: float = 10.0,
    response_timeout_s: float = 900.0,
) -> FastAPI:
    """A FastAPI app forwarding the OpenAI routes we serve to `upstream_url`.

    Every wait on the engine is bounded: `request_timeout_s` for its model list, health, version
    and metrics; `response_timeout_s` until a completion's response headers (vLLM sends a
    non-streamed answer's headers only once it is complete). Past either: a 504 envelope.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # No read timeout: a long generation streams for minutes; the client's disconnect,
        # not a timer, ends it. Pool limits bound the connections we hold to the engine.
        async with httpx.AsyncClient(
            base_url=upstream_url,
            transport=transport,
            timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=30.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=64),
            headers={"accept-encoding": "identity"},
        ) as client:
            app.state.client = client
            yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return _envelope(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return _envelope(400, "invalid request: " + "; ".join(str(e.get("msg")) for e in exc.errors()))

    async def forward(request: Request) -> Response:
        client: httpx.AsyncClient = request.app.state.client
        headers = {k: v for k, v in request.headers.items() if k in _FORWARDED_REQUEST_HEADERS}
        completion = request.method == "POST"
        outgoing = client.build_request(
            request.method,
            request.url.path,
            content=await request.body(),
            headers=headers,
            timeout=None if completion else httpx.Timeout(request_timeout_s),
        )
        try:
            with anyio.fail_after(response_timeout_s if completion else request_timeout_s * 2):
                upstream = await client.send(outgoing, stream=True)
        except (TimeoutError, httpx.TimeoutException):
            log.error("engine at %s did not answer in time", upstream_url)
            return _envelope(504, "the engine did not answer in time", code="engine_timeout")
        except httpx.TransportError as exc:
            log.error("engine unreachable at %s: %s", upstream_url, type(exc).__name__)
            return _envelope(502, "the engine is unreachable")
        return UpstreamResponse(upstream)

    for path in ("/v1/chat/completions", "/v1/completions"):
        app.add_api_route(path, forward, methods=["POST"], include_in_schema=False, response_model=None)
    for path in ("/v1/models", "/version", "/metrics"):
        app.add_api_route(path, forward, methods=["GET"], include_in_schema=False, response_model=None)

    @app.get("/health", include_in_schema=False)
    async def health(request: Request) -> Response:
        client: httpx.AsyncClient = request.app.state.client
        try:
            with anyio.fail_after(request_timeout_s):
                ok = (await client.get("/health", timeout=request_timeout_s)).status_code == 200
        except (httpx.HTTPError, TimeoutError):
            ok = False
        return Response(status_code=200) if ok else _envelope(503, "the engine is not healthy")

    return app
