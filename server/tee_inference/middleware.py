"""The request path: auth, the confidential gate, and signing of every completion.

`SigningMiddleware` is a pure ASGI middleware that works in both deployments:

- inside vLLM, through `vllm serve --middleware tee_inference.middleware.SigningMiddleware`
  (vLLM constructs it with the app alone, so it reads `ServerConfig` from the environment);
- in front of the standalone proxy or the fake engine, in `tee-inference serve`.

Read top to bottom: `SigningMiddleware.__call__` routes a request; completions go through a
per-request `SignedExchange`, which reads and hashes the request body, applies the gate,
and wraps `send` so that each response byte is hashed as it passes. When the response
ends, `sha256(request):sha256(response)` is signed with both algorithms and stored under
the completion id. Streams pass through untouched and unbuffered; a non-streaming body is
held until it ends so its signature can travel in the response headers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final

from tee_inference import routes
from tee_inference.asgi import ASGIApp, Message, Receive, Scope, Send, header
from tee_inference.config import ServerConfig
from tee_inference.envelope import error_body, normalize_error_body, send_error, send_json
from tee_inference.handoff import services_for_process
from tee_inference.services import Services
from tee_inference.signing import CompletionSignature
from tee_inference.sse import StreamIdScanner, completion_id_from_json

log = logging.getLogger("tee_inference.middleware")

_ERROR_BODY_LIMIT: Final = 64 << 10
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*"([A-Za-z0-9._:-]{1,256})"')
GET, POST, ANY = frozenset({"GET"}), frozenset({"POST"}), frozenset[str]()


async def completion(req: routes.Request) -> None:
    await SignedExchange(req.services, req.app, req.scope, req.send).run(req.receive)


async def engine(req: routes.Request) -> None:
    await ErrorNormalizer(req.send).run(req.app, req.scope, req.receive)


# Every route that exists. Anything else the engine might expose (tokenizer, pooling, adapters,
# admin, /invocations) is answered 404 here: what is reachable is what we sign. A prefix row
# with no methods (ANY) answers every method.
ROUTES: Final[tuple[routes.Route, ...]] = (
    routes.Route("/v1/chat/completions", POST, completion, "/v1/chat/completions"),
    routes.Route("/v1/completions", POST, completion, "/v1/completions"),
    routes.Route("/v1/models", GET, routes.models, "/v1/models"),
    routes.Route(routes.SIGNATURE_PREFIX, GET, routes.signature, "signature", prefix=True),
    routes.Route("/v1/attestation/report", GET, routes.attestation_report, "/v1/attestation/report"),
    routes.Route("/metrics", GET, routes.metrics, "/metrics"),
    routes.Route("/v1/tls/csr", GET, routes.tls_csr, "/v1/tls/csr"),
    routes.Route("/v1/tls/certificate", POST, routes.tls_certificate, "/v1/tls/certificate"),
    routes.Route("/version", GET, engine, "/version"),
    routes.Route("/health", frozenset({"GET", "HEAD"}), routes.health, "/health", public=True),
    # Modalities this server does not offer confidentially: refused, never forwarded.
    *(
        routes.Route(prefix, ANY, routes.not_available, "not_available", prefix=True)
        for prefix in ("/v1/embeddings", "/v1/images", "/v1/audio", "/v1/moderations", "/v1/fine_tuning")
    ),
)


class RouteTable:
    """Exact paths by dictionary, prefixes in table order: `match` is O(1) for every hot route."""

    def __init__(self, table: tuple[routes.Route, ...]) -> None:
        self.exact = {r.path: r for r in table if not r.prefix}
        self.prefixes = tuple(r for r in table if r.prefix)

    def match(self, path: str) -> routes.Route | None:
        route = self.exact.get(path)
        if route is None:
            route = next((r for r in self.prefixes if path.startswith(r.path)), None)
        return route


class SigningMiddleware:
    def __init__(self, app: ASGIApp, config: ServerConfig | None = None, *, services: Services | None = None):
        self.app = app
        # vLLM constructs us with the app alone: the configuration comes from the environment and
        # the boot from the launcher's handoff (or, without a launcher, is run here).
        self.services = services or services_for_process(config or ServerConfig.from_env())
        self.routes = RouteTable(ROUTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # Nothing we serve is a websocket, and an unsigned channel must not open.
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan: vLLM and the proxy need theirs
            return
        route = self.routes.match(scope["path"])
        observed = _Observed(self.services, route.name if route else "unknown", send)
        try:
            await self._dispatch(route, scope, receive, observed.send)
        except Exception:
            # Whatever broke, the client gets the envelope (or a closed stream), never a trace.
            log.exception("request to %s failed", observed.route)
            if observed.status == 0:
                await send_error(observed.send, 500, "internal error", code="internal_error")
        finally:
            observed.finish()

    async def _dispatch(self, route: routes.Route | None, scope: Scope, receive: Receive, send: Send) -> None:
        """Match, authorize unless public, 404/405, call."""
        if (route is None or not route.public) and not self.services.authorized(
            header(scope, b"authorization")
        ):
            await send_error(
                send, 401, "missing or invalid bearer token", extra_headers=[(b"www-authenticate", b"Bearer")]
            )
            return
        if route is None:
            await send_error(send, 404, f"no route {scope['path'][:200]!r}")
            return
        if route.methods and scope["method"] not in route.methods:
            await send_error(
                send,
                405,
                f"method {scope['method'][:20]} is not allowed here",
                extra_headers=[(b"allow", ", ".join(sorted(route.methods)).encode())],
            )
            return
        await route.handler(routes.Request(self.services, self.app, scope, receive, send))


class _Observed:
    """Counts a request's status and timings; never sees its content."""

    __slots__ = ("_send", "first_byte", "metrics", "route", "started", "status")

    def __init__(self, services: Services, route: str, send: Send) -> None:
        self.metrics = services.metrics
        self.route = route
        self._send = send
        self.started = time.perf_counter()
        self.first_byte: float | None = None
        self.status = 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        elif self.first_byte is None and message.get("body"):
            self.first_byte = time.perf_counter()
            self.metrics.first_byte.labels(self.route).observe(self.first_byte - self.started)
        await self._send(message)

    def finish(self) -> None:
        self.metrics.requests.labels(self.route, str(self.status or 499)).inc()
        self.metrics.latency.labels(self.route).observe(time.perf_counter() - self.started)


class ErrorNormalizer:
    """Passes a response through, rewriting an error body into the one envelope."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.start: Message | None = None
        self.error_body = bytearray()

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive) -> None:
        await app(scope, receive, self.send_normalized)

    async def send_normalized(self, message: Message) -> None:
        if message["type"] == "http.response.start" and int(message["status"]) >= 400:
            self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.error_body += message.get("body", b"")
        if len(self.error_body) > _ERROR_BODY_LIMIT:
            # Not an error document we could rewrite; drop it rather than leak a trace.
            self.error_body = bytearray(b"{}")
        if not message.get("more_body", False):
            status = int(self.start["status"])
            await send_json(self.send, status, normalize_error_body(status, bytes(self.error_body)))


class SignedExchange:
    """One completion request: read and gate the request, then sign the response as it passes.

    Response modes, chosen by the engine's response start:
    - `stream` (text/event-stream): every body message is hashed and forwarded at once;
    - `held` (a JSON body): messages are kept until the body ends, then sent with the
      `X-Signature*` headers; past `max_held_response_bytes` it turns into `stream`;
    - `error` (status 400 and up): the body becomes the error envelope, unsigned;
    - `passthrough` (any other status but 200): forwarded as it is, unsigned.
    """

    def __init__(self, services: Services, app: ASGIApp, scope: Scope, send: Send) -> None:
        self.services = services
        self.app = app
        self.scope = scope
        self.client_send = send
        self.request_hash = hashlib.sha256()
        self.response_hash = hashlib.sha256()
        self.mode = ""
        self.start: Message | None = None
        self.held: list[bytes] = []
        self.held_size = 0
        self.scanner: StreamIdScanner | None = None
        self.completion_id: str | None = None
        self.client_started = False
        self.finished = False
        self.client_gone = False

    # -- request ---------------------------------------------------------------------------

    async def run(self, receive: Receive) -> None:
        body = await self.read_body(receive)
        if body is None or not await self.gate(body):
            return
        try:
            await self.app(self.scope, self.replay(body, receive), self.on_engine_message)
        except Exception as exc:
            if self.client_gone:
                self.services.metrics.unsigned.labels("client_disconnected").inc()
                raise
            log.error("engine failed during %s: %s", self.scope["path"], type(exc).__name__)
            await self.engine_failed()
            return
        if self.client_gone:
            self.services.metrics.unsigned.labels("client_disconnected").inc()
        elif not self.finished:
            await self.engine_failed()

    def replay(self, body: bytes, receive: Receive) -> Receive:
        """Give the engine the body we already read, then the real channel (for disconnects)."""
        delivered = False

        async def replayed() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
            return message

        return replayed

    async def read_body(self, receive: Receive) -> bytes | None:
        limit = self.services.config.max_request_bytes
        declared = header(self.scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await send_error(self.client_send, 413, f"request body larger than {limit} bytes")
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_error(self.client_send, 413, f"request body larger than {limit} bytes")
                return None
            self.request_hash.update(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def gate(self, body: bytes) -> bool:
        """Only well-formed requests for a served, attested model reach the engine."""
        content_type = (header(self.scope, b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            await send_error(self.client_send, 415, "send the request body as application/json")
            return False
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            await send_error(self.client_send, 400, "request body is not valid JSON", code="invalid_json")
            return False
        if not isinstance(request, dict):
            await send_error(self.client_send, 400, "request body must be a JSON object", code="invalid_json")
            return False
        model = request.get("model")
        if not isinstance(model, str):
            await send_error(self.client_send, 400, "'model' is required and must be a string", param="model")
            return False
        served = await self.services.models.names(self.app, self.scope)
        if served is None:
            await send_error(self.client_send, 503, "the engine is not ready yet", code="engine_unavailable")
            return False
        if model not in served:
            self.services.metrics.gate_rejections.labels("model_not_confidential").inc()
            await send_error(
                self.client_send,
                400,
                f"model {model[:200]!r} is not served by this confidential server",
                code="model_not_confidential",
                param="model",
            )
            return False
        return True

    # -- response --------------------------------------------------------------------------

    async def on_engine_message(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            headers = message.get("headers", [])
            content_type = next((bytes(v) for k, v in headers if k.lower() == b"content-type"), b"")
            status = int(message["status"])
            if status >= 400:
                self.mode = "error"
            elif status != 200:
                # Not a completion (an engine's redirect or 204, say): nothing to sign or rewrite.
                self.mode = "passthrough"
                await self.forward_start([])
            elif content_type.startswith(b"text/event-stream"):
                self.mode = "stream"
                self.scanner = StreamIdScanner()
                await self.forward_start([(b"x-signing-address", self.signing_address)])
            else:
                self.mode = "held"
            return
        if message["type"] != "http.response.body":
            await self.forward(message)
            return
        body: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if self.mode == "stream":
            await self.on_stream_body(body, more)
        elif self.mode == "held":
            await self.on_held_body(body, more)
        elif self.mode == "error":
            await self.on_error_body(body, more)
        else:
            self.finished = not more
            await self.forward(message)

    async def on_stream_body(self, body: bytes, more: bool) -> None:
        self.response_hash.update(body)
        if self.scanner is not None:
            self.scanner.feed(body)
        await self.forward({"type": "http.response.body", "body": body, "more_body": more})
        if not more:
            self.finished = True
            if self.scanner is not None:
                self.completion_id = self.scanner.completion_id
            await self.sign_and_store()

    async def on_held_body(self, body: bytes, more: bool) -> None:
        self.response_hash.update(body)
        self.held.append(body)
        self.held_size += len(body)
        if not more:
            self.finished = True
            whole = b"".join(self.held)
            self.completion_id = completion_id_from_json(whole)
            signature = await self.sign_and_store()
            await self.forward_start(
                [
                    (b"content-length", str(len(whole)).encode("ascii")),
                    (b"x-signature-text", signature.text.encode("ascii")),
                    (b"x-signature", signature.ecdsa.hex().encode("ascii")),
                    (b"x-signing-address", self.signing_address),
                    (b"x-signature-ed25519", signature.ed25519.hex().encode("ascii")),
                    (b"x-signing-public-key-ed25519", signature.ed25519_public_key.hex().encode("ascii")),
                ]
            )
            await self.forward({"type": "http.response.body", "body": whole, "more_body": False})
        elif self.held_size > self.services.config.max_held_response_bytes:
            # Too big to hold: send what we have and stream the rest; the id leads vLLM's JSON.
            match = _LEADING_ID.match(self.held[0] if len(self.held) == 1 else b"".join(self.held[:4]))
            self.mode = "stream"
            self.completion_id = match.group(1).decode() if match else None
            await self.forward_start([(b"x-signing-address", self.signing_address)])
            await self.forward({"type": "http.response.body", "body": b"".join(self.held), "more_body": True})
            self.held = []

    async def on_error_body(self, body: bytes, more: bool) -> None:
        if self.held_size <= _ERROR_BODY_LIMIT:
            self.held.append(body)
            self.held_size += len(body)
        if not more:
            self.finished = True
            assert self.start is not None
            status = int(self.start["status"])
            text = b"".join(self.held) if self.held_size <= _ERROR_BODY_LIMIT else b"{}"
            self.client_started = True
            await self.guarded(
                lambda: send_json(self.client_send, status, normalize_error_body(status, text))
            )

    async def engine_failed(self) -> None:
        """The engine broke: an envelope if nothing was sent yet, else a final error event."""
        if not self.client_started:
            body = error_body(500, "the engine failed to produce a response", code="engine_error")
            await self.guarded(lambda: send_json(self.client_send, 500, body))
            return
        if self.mode == "stream" and not self.finished:
            event = (
                b"data: "
                + error_body(500, "the engine failed during the stream", code="engine_error")
                + b"\n\n"
            )
            await self.on_stream_body(event, more=False)

    async def sign_and_store(self) -> CompletionSignature:
        started = time.perf_counter()
        signature = self.services.signer.sign(self.request_hash.hexdigest(), self.response_hash.hexdigest())
        metrics = self.services.metrics
        metrics.signing_seconds.observe(time.perf_counter() - started)
        if self.completion_id is None:
            metrics.unsigned.labels("no_completion_id").inc()
        else:
            await self.services.store.put(self.completion_id, signature)
            metrics.signatures.inc()
        return signature

    # -- to the client ---------------------------------------------------------------------

    @property
    def signing_address(self) -> bytes:
        return self.services.signer.ecdsa.address.encode("ascii")

    async def forward_start(self, extra_headers: list[tuple[bytes, bytes]]) -> None:
        assert self.start is not None
        self.client_started = True
        start = dict(self.start)
        replaced = {name for name, _ in extra_headers}
        kept = [(k, v) for k, v in self.start.get("headers", []) if bytes(k).lower() not in replaced]
        start["headers"] = [*kept, *extra_headers]
        await self.forward(start)

    async def forward(self, message: Message) -> None:
        await self.guarded(lambda: self.client_send(message))

    async def guarded(self, action: Callable[[], Awaitable[None]]) -> None:
        try:
            await action()
        except Exception:
            self.client_gone = True
            raise
