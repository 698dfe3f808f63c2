"""One completion, from its request bytes to its signed answer: the per-request responder.

`SignedExchange` reads and hashes the request body (bounded in size, time and bytes held across
connections, `intake.py`), applies the gate and admission control, and wraps `send` so that each
response byte is hashed as it passes. The completion id is the engine's own random one: a
client's `X-Request-Id` is stripped and a body `request_id` refused. Before the last bytes are
released (a stream's `data: [DONE]`, a JSON body's end), `sha256(request):sha256(response)` is
signed with both algorithms and stored under the id, so a client that holds the whole answer can
always fetch its signature. Streams pass through unbuffered; a non-streaming body is held until
it ends so its signature can travel in the response headers.

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

from tee_inference.asgi import ASGIApp, Message, Receive, Scope, Send, header
from tee_inference.cachesalt import partitioned
from tee_inference.e2ee import (
    ENC_HEADER,
    E2eeRefusal,
    ServerExchange,
    encrypting_send,
    open_request,
    response_headers,
)
from tee_inference.envelope import error_body, send_error, send_json, send_normalized_error
from tee_inference.intake import Intake
from tee_inference.metering import UsageMeter
from tee_inference.observe import Observed
from tee_inference.services import Services
from tee_inference.signing import CompletionSignature
from tee_inference.sse import (
    DONE_EVENT,
    DoneSplitter,
    StreamIdScanner,
    completion_fields_from_json,
    inband_comment,
)

log = logging.getLogger("tee_inference.exchange")

_ERROR_BODY_LIMIT: Final = 64 << 10
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*"([A-Za-z0-9._:-]{1,256})"')


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
        keys, enc = self.services.keys.e2ee, header(self.scope, ENC_HEADER) or b""
        try:
            self.e2ee, plaintext = open_request(keys, self.services.e2ee_replays, enc, ciphertext)
            shared = self.services.shared_replays
            if shared is not None and not await shared.first_use(self.e2ee.enc):
                raise E2eeRefusal.replayed()  # answered by another process of this node, or replica
        except E2eeRefusal as refused:
            await send_error(self.client_send, refused.status, str(refused), code=refused.code)
            return None
        self.error_send = encrypting_send(self.e2ee, self.client_send)
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
                self.meter.feed_event(body)
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
            length = (b"content-length", str(len(whole)).encode("ascii"))
            await self.forward_start([length, *signature.response_headers()])
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
