"""The request path: auth, the confidential gate, admission, and signing of every completion.

`SigningMiddleware` is a pure ASGI middleware that works in both deployments:

- inside vLLM, through `vllm serve --middleware tee_inference.middleware.SigningMiddleware`
  (vLLM constructs it with the app alone, so it reads `ServerConfig` from the environment);
- in front of the standalone proxy or the fake engine, in `tee-inference serve`.

Read top to bottom: `SigningMiddleware.__call__` routes a request; completions go through a
per-request `SignedExchange`, which reads and hashes the request body (bounded in size, time
and bytes held across connections), applies the gate and admission control, and wraps `send`
so that each response byte is hashed as it passes. The completion id is the engine's own
random one: a client's `X-Request-Id` is stripped and a body `request_id` refused. Before the
last bytes are released (a stream's `data: [DONE]`, a JSON body's end),
`sha256(request):sha256(response)` is signed with both algorithms and stored under the id, so
a client that holds the whole answer can always fetch its signature. Streams pass through
unbuffered; a non-streaming body is held until it ends so its signature can travel in the
response headers.

An end-to-end encrypted request (EHBP, `e2ee.py`: `Ehbp-Encapsulated-Key`) is decrypted after
its ciphertext was hashed and before the gate; every answer to it is encrypted back, and the
signed hashes are of the ciphertext both ways: the exact bytes the client sent and received.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final

from tee_inference import routes
from tee_inference.asgi import ASGIApp, Message, Receive, Scope, Send, header
from tee_inference.cachesalt import partitioned
from tee_inference.config import ServerConfig
from tee_inference.e2ee import (
    ENC_HEADER,
    KEYS_PATH,
    E2eeError,
    ServerExchange,
    encrypting_send,
    response_headers,
)
from tee_inference.envelope import error_body, send_error, send_json, send_normalized_error
from tee_inference.handoff import services_for_process
from tee_inference.intake import Intake
from tee_inference.metering import UsageMeter
from tee_inference.observe import Observed, ensure_log_handler
from tee_inference.routes import RouteTable
from tee_inference.services import Services
from tee_inference.signing import CompletionSignature
from tee_inference.sse import (
    DONE_EVENT,
    DoneSplitter,
    StreamIdScanner,
    completion_fields_from_json,
    inband_comment,
)

log = logging.getLogger("tee_inference.middleware")

_ERROR_BODY_LIMIT: Final = 64 << 10
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*"([A-Za-z0-9._:-]{1,256})"')
GET, POST, ANY = frozenset({"GET"}), frozenset({"POST"}), frozenset[str]()


async def completion(req: routes.Request) -> None:
    await SignedExchange(req.services, req.app, req.scope, req.send, req.observed).run(req.receive)


# Every route that exists. Anything else the engine might expose (tokenizer, pooling, adapters,
# admin, /invocations) is answered 404 here: what is reachable is what we sign. A prefix row
# with no methods (ANY) answers every method.
ROUTES: Final[tuple[routes.Route, ...]] = (
    routes.Route("/v1/chat/completions", POST, completion, "/v1/chat/completions"),
    routes.Route("/v1/completions", POST, completion, "/v1/completions"),
    routes.Route("/v1/models", GET, routes.models, "/v1/models"),
    routes.Route(routes.SIGNATURE_PREFIX, GET, routes.signature, "signature", prefix=True),
    routes.Route(routes.USAGE_PREFIX, GET, routes.usage_by_ref, "usage", prefix=True),
    routes.Route("/v1/attestation/report", GET, routes.attestation_report, "/v1/attestation/report"),
    routes.Route("/metrics", GET, routes.metrics, "/metrics"),
    routes.Route(KEYS_PATH, GET, routes.hpke_keys, KEYS_PATH),
    routes.Route("/v1/tls/csr", GET, routes.tls_csr, "/v1/tls/csr"),
    routes.Route("/v1/tls/certificate", POST, routes.tls_certificate, "/v1/tls/certificate"),
    routes.Route("/version", GET, routes.engine, "/version"),
    routes.Route("/health", frozenset({"GET", "HEAD"}), routes.health, "/health", public=True),
    # Modalities this server does not offer confidentially: refused, never forwarded.
    *(
        routes.Route(prefix, ANY, routes.not_available, "not_available", prefix=True)
        for prefix in ("/v1/embeddings", "/v1/images", "/v1/audio", "/v1/moderations", "/v1/fine_tuning")
    ),
)


class SigningMiddleware:
    def __init__(self, app: ASGIApp, config: ServerConfig | None = None, *, services: Services | None = None):
        self.app = app
        if services is None:
            # vLLM constructs us with the app alone: the configuration comes from the environment,
            # the boot from the launcher's handoff (or, without a launcher, is run here), and our
            # log lines need a handler of their own (vLLM configures only its loggers).
            ensure_log_handler()
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
        observed = Observed(self.services.metrics, route.name if route else "unknown", scope["method"], send)
        try:
            await self._dispatch(route, scope, receive, observed)
        except Exception as exc:
            # Whatever broke, the client gets the envelope (or a closed stream), never a trace;
            # the log line names the failure's type only (a message may quote a prompt).
            log.error("request to %s failed: %s", observed.route, type(exc).__name__)
            if observed.status == 0:
                await send_error(observed.send, 500, "internal error", code="internal_error")
        finally:
            observed.finish()

    async def _dispatch(
        self, route: routes.Route | None, scope: Scope, receive: Receive, observed: Observed
    ) -> None:
        """Match, authorize unless public, 404/405, call."""
        send = observed.send
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
                f"method {scope['method'][:20]!r} is not allowed here",
                extra_headers=[(b"allow", ", ".join(sorted(route.methods)).encode())],
            )
            return
        await route.handler(routes.Request(self.services, self.app, scope, receive, send, observed))


class SignedExchange:
    """One completion request: read, gate and admit the request, then sign the response as it passes.

    The request side (body, gate, admission) is `intake.Intake`; this class is the response side.
    Response modes, chosen by the engine's response start:
    - `stream` (text/event-stream): body bytes are hashed and forwarded at once, except the final
      `data: [DONE]` event, which is hashed, signed and stored before it is forwarded;
    - `held` (a JSON body): messages are kept until the body ends, then signed, stored and sent
      with the `X-Signature*` headers; past `max_held_response_bytes` it turns into `stream`;
    - `error` (status 400 and up): the body becomes the error envelope, unsigned;
    - `passthrough` (any other status but 200): forwarded as it is, unsigned.
    """

    def __init__(
        self, services: Services, app: ASGIApp, scope: Scope, send: Send, observed: Observed
    ) -> None:
        self.services = services
        self.config = services.config
        self.app = app
        self.scope = scope
        self.client_send = send
        self.observed = observed
        self.request_hash = hashlib.sha256()
        self.response_hash = hashlib.sha256()
        self.mode = ""
        self.start: Message | None = None
        self.held: list[bytes] = []
        self.held_size = 0
        self.scanner: StreamIdScanner | None = None
        self.splitter: DoneSplitter | None = None
        self.inband = header(scope, b"x-signature-inband") in (b"1", b"true")
        self.e2ee: ServerExchange | None = None
        self.error_send = send  # errors go here: encrypted too, once a request decrypted
        self.completion_id: str | None = None
        self.admitted_at = 0.0
        self.client_started = False
        self.signed = False  # signed and stored: nothing the client can still receive is unsigned
        self.closed = False  # the final body message went to the client
        self.client_gone = False
        # Scale-out hooks (docs/scale-out.md): usage counted as bytes pass, tenants' cache salts.
        self.meter = UsageMeter(services, app, scope)
        # Set once a plaintext stream's id is found and its first byte is out: from then on each
        # event takes `on_engine_message`'s first branch (hash, count, forward) and nothing else.
        self.hot = False
        self.hot_events = 0

    # -- request ---------------------------------------------------------------------------

    async def run(self, receive: Receive) -> None:
        intake = Intake(self.services, self.app, self.scope, self.client_send)
        try:
            body = await intake.read_body(receive)
            if body is not None and header(self.scope, ENC_HEADER) is not None:
                body = await self.decrypt(body)
                intake.client_send = self.error_send
            if body is None or not await intake.gate(body) or not await intake.admit():
                return
            self.request_hash = intake.request_hash
            self.admitted_at = intake.admitted_at
            self.meter.request = intake.request
            try:
                await self.call_engine(body, receive)
            finally:
                self.services.admission.release()
                scanned = self.scanner.completion_id if self.scanner else None
                await self.meter.finish(self.completion_id or scanned)
        finally:
            intake.release_body()
            self.observed.signed = self.signed if self.mode in ("stream", "held") else None
            if self.hot_events:
                self.observed.stream_events = (self.observed.stream_events or 0) + self.hot_events

    async def decrypt(self, ciphertext: bytes) -> bytes | None:
        """The plaintext of an encrypted body, or None once a 4xx envelope has gone out."""
        enc = header(self.scope, ENC_HEADER) or b""
        try:
            exchange = ServerExchange(self.services.keys.e2ee, enc)
            plaintext = exchange.open_body(ciphertext)
        except E2eeError as exc:
            # One generic answer per class: no oracle on which cryptographic step failed.
            status, code = (
                (422, "e2ee_key_mismatch") if "authenticate" in str(exc) else (400, "e2ee_malformed")
            )
            message = "the body does not decrypt under this server's attested key: attest again"
            await send_error(self.client_send, status, message if status == 422 else str(exc), code=code)
            return None
        if not self.services.e2ee_replays.first_use(exchange.enc):
            await send_error(
                self.client_send, 409, "this encrypted request was already answered", code="e2ee_replay"
            )
            return None
        self.e2ee = exchange
        self.error_send = encrypting_send(exchange, self.client_send)
        self.inband = False  # an in-band signature inside the ciphertext would have to cover itself
        return plaintext

    async def call_engine(self, body: bytes, receive: Receive) -> None:
        # vLLM builds the completion id from `X-Request-Id`: the engine never sees one; nor the
        # encryption headers of a body it gets in plaintext.
        dropped = [b"x-request-id"]
        if self.e2ee is not None:  # the body's framing headers described the ciphertext
            dropped += [ENC_HEADER, b"content-length", b"transfer-encoding"]
        headers = [(k, v) for k, v in self.scope["headers"] if k not in dropped]
        if self.e2ee is not None:
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        body, headers = partitioned(
            self.services.keys.cache_salt_key, self.config.cache_isolation, self.scope, self.meter.request,
            body, headers,
        )  # fmt: skip
        # The engine's request state is shared with ours: vLLM leaves its usage count there.
        self.scope.setdefault("state", {})
        scope = {**self.scope, "headers": headers}
        try:
            await self.app(scope, self.replay(body, receive), self.on_engine_message)
        except Exception as exc:
            if self.client_gone:
                self.count_unsigned_disconnect()
                raise
            log.error("engine failed during %s: %s", self.scope["path"], type(exc).__name__)
            await self.engine_failed()
            return
        if self.client_gone:
            self.count_unsigned_disconnect()
        elif not self.signed:
            await self.engine_failed()
        elif not self.closed:
            await self.forward({"type": "http.response.body", "body": b"", "more_body": False})

    def replay(self, body: bytes, receive: Receive) -> Receive:
        """Give the engine the body we already read, then the real channel (for disconnects)."""
        delivered = False

        async def replayed() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            # After the answer is complete, uvicorn reports a disconnect to whoever still listens
            # (the proxy does): that is the end of the exchange, not a client leaving.
            if message["type"] == "http.disconnect" and not self.closed:
                self.client_gone = True
            return message

        return replayed

    # -- response --------------------------------------------------------------------------

    async def on_engine_message(self, message: Message) -> None:
        if self.hot and message["type"] == "http.response.body" and message.get("more_body", False):
            body: bytes = message.get("body", b"")
            assert self.splitter is not None  # hot implies a stream that began as one
            if self.splitter.passes(body):
                # One token event: what `on_stream_body` would do, in one frame.
                self.response_hash.update(body)
                self.meter.feed(body)
                self.hot_events += 1
                try:
                    await self.observed.downstream(message)
                except Exception:
                    self.client_gone = True
                    raise
                return
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
                self.splitter = DoneSplitter()
                self.observed.stream_events = 0
                await self.forward_start([(b"x-signing-address", self.signing_address)])
            else:
                self.mode = "held"
            return
        if message["type"] != "http.response.body":
            await self.forward(message)
            return
        body = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if self.mode == "stream":
            await self.on_stream_body(body, more, message)
        elif self.mode == "held":
            await self.on_held_body(body, more)
        elif self.mode == "error":
            await self.on_error_body(body, more)
        else:
            self.signed = not more
            if self.e2ee is not None:  # an answer to an encrypted request is encrypted, signed or not
                message = {**message, "body": self.e2ee.seal(body)}
            await self.forward(message)

    async def on_stream_body(self, body: bytes, more: bool, message: Message | None = None) -> None:
        if self.signed:
            # After `[DONE]`: nothing more is released, since nothing more is signed.
            if body:
                log.warning("engine sent %d bytes after the end of a signed stream; dropped", len(body))
            if not more:
                await self.forward({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if self.observed.first_byte is None and body and self.admitted_at:
            self.services.admission.observe_first_token(time.perf_counter() - self.admitted_at)
        ready, done = self.splitter.feed(body) if self.splitter is not None else (body, None)
        if done is None and not more:
            done = self.splitter.flush() if self.splitter is not None else b""
        if ready:
            wire = self.account(ready)
            if done is None and wire is body and message is not None:
                # The common case, a chunk of whole events: the engine's own message goes on
                # (its more_body is true, or `done` would be set), nothing is rebuilt.
                await self.forward(message)
                self.hot = (
                    self.splitter is not None  # not a held body turned into a stream
                    and self.scanner is None
                    and self.e2ee is None
                    and self.observed.first_byte is not None
                )
                return
            await self.forward({"type": "http.response.body", "body": wire, "more_body": True})
        if done is None:
            return
        # The last bytes: hash, sign and store first, then release them.
        self.hot = False
        last = done[: len(DONE_EVENT)] if done.startswith(DONE_EVENT) else done
        if len(last) < len(done):
            log.warning("engine sent %d bytes after [DONE]; dropped", len(done) - len(last))
        wire = self.account(last)
        if self.scanner is not None:  # still looking (or never found one): what it has is the id
            self.completion_id = self.scanner.completion_id
            self.scanner = None
        signature = await self.sign_and_store()
        if self.inband:
            comment = inband_comment(self.completion_id, signature)
            await self.forward({"type": "http.response.body", "body": comment, "more_body": True})
        await self.forward({"type": "http.response.body", "body": wire, "more_body": more})

    def account(self, data: bytes) -> bytes:
        """Every byte the client will get (the in-band comment aside) goes through here, in order.

        Returns the bytes to send: ``data`` itself, or its encrypted frame. The hash is of what is
        sent; the id scanner reads the plaintext.
        """
        wire = self.e2ee.seal(data) if self.e2ee is not None else data
        self.response_hash.update(wire)
        if self.scanner is not None:
            self.scanner.feed(data)
            if self.scanner.done:  # found (or given up): no more per-event work for the id
                self.completion_id = self.scanner.completion_id
                self.scanner = None
        if self.splitter is not None:  # an SSE stream (not a held body turned into one)
            self.meter.feed(data)
        if self.observed.stream_events is not None:
            self.observed.stream_events += data.count(b"\n\n")
        return wire

    async def on_held_body(self, body: bytes, more: bool) -> None:
        if self.e2ee is None:
            self.response_hash.update(body)
        self.held.append(body)
        self.held_size += len(body)
        if not more:
            whole = b"".join(self.held)
            self.completion_id, self.observed.completion_tokens = completion_fields_from_json(whole)
            self.meter.held(whole)
            if self.e2ee is not None:
                whole = self.e2ee.seal(whole)  # one frame; its bytes are what is signed and sent
                self.response_hash.update(whole)
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
        elif self.held_size > self.config.max_held_response_bytes:
            # Too big to hold: send what we have and stream the rest; the id leads vLLM's JSON.
            match = _LEADING_ID.match(self.held[0] if len(self.held) == 1 else b"".join(self.held[:4]))
            self.mode = "stream"
            self.inband = False  # a JSON body has no place for an SSE comment: fetch by id
            self.completion_id = match.group(1).decode() if match else None
            await self.forward_start([(b"x-signing-address", self.signing_address)])
            held, self.held = b"".join(self.held), []
            wire = held if self.e2ee is None else self.account(held)
            await self.forward({"type": "http.response.body", "body": wire, "more_body": True})

    async def on_error_body(self, body: bytes, more: bool) -> None:
        if self.held_size <= _ERROR_BODY_LIMIT:
            self.held.append(body)
            self.held_size += len(body)
        if not more:
            assert self.start is not None
            status = int(self.start["status"])
            text = b"".join(self.held) if self.held_size <= _ERROR_BODY_LIMIT else b"{}"
            self.client_started = True
            await self.guarded(lambda: send_normalized_error(self.error_send, status, text))
            self.closed = True

    async def engine_failed(self) -> None:
        """The engine broke: an envelope if nothing was sent yet, else a final error event."""
        if not self.client_started:
            body = error_body(500, "the engine failed to produce a response", code="engine_error")
            await self.guarded(lambda: send_json(self.error_send, 500, body))
            self.closed = True
            return
        if self.mode == "stream" and not self.signed:
            event = (
                b"data: "
                + error_body(500, "the engine failed during the stream", code="engine_error")
                + b"\n\n"
            )
            await self.on_stream_body(event, more=False)
        elif not self.closed:
            await self.forward({"type": "http.response.body", "body": b"", "more_body": False})

    async def sign_and_store(self) -> CompletionSignature:
        started = time.perf_counter()
        signature = self.services.signer.sign(self.request_hash.hexdigest(), self.response_hash.hexdigest())
        metrics = self.services.metrics
        metrics.signing_seconds.observe(time.perf_counter() - started)
        self.signed = True
        self.observed.completion_id = self.completion_id
        if self.completion_id is None:
            metrics.unsigned.labels("no_completion_id").inc()
        elif await self.services.store.put(self.completion_id, signature):
            metrics.signatures.inc()
        else:
            # Held already (never replaced) or not an id the signature route could serve.
            log.warning("signature not stored: its completion id is already held or not fetchable")
            metrics.unsigned.labels("id_not_stored").inc()
        return signature

    def count_unsigned_disconnect(self) -> None:
        if not self.signed:
            self.services.metrics.unsigned.labels("client_disconnected").inc()

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
        if self.e2ee is not None:
            start["headers"] = response_headers(self.e2ee, start["headers"])
        await self.forward(start)

    async def forward(self, message: Message) -> None:
        # `guarded` inlined: this runs once per streamed event.
        try:
            await self.client_send(message)
        except Exception:
            self.client_gone = True
            raise
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.closed = True

    async def guarded(self, action: Callable[[], Awaitable[None]]) -> None:
        try:
            await action()
        except Exception:
            self.client_gone = True
            raise
