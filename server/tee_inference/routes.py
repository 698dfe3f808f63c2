"""The endpoints the signing layer answers itself, and the route table's types.

Every handler is a coroutine over one `Request` (services, the wrapped engine app, the ASGI
scope and channels), so the middleware can answer it in front of any engine, vLLM in-process
included. The table that maps paths to these handlers is `middleware.ROUTES`: adding an
endpoint is one row there and one handler here.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs

import anyio

from tee_inference.asgi import ASGIApp, BodyTooLarge, Message, Receive, Scope, Send, read_body
from tee_inference.e2ee import KEYS_MEDIA_TYPE, key_config, public_bytes
from tee_inference.envelope import send_error, send_json, send_normalized_error
from tee_inference.exceptions import ConfigError, TrustRootError
from tee_inference.observe import Observed
from tee_inference.reports import ReportBusy, parse_nonce
from tee_inference.services import Services
from tee_inference.signing import SIGNING_ALGOS, parse_signing_algo
from tee_inference.store import is_storable_id
from tee_inference.subrequest import call_app

SIGNATURE_PREFIX: Final = "/v1/signature/"
USAGE_PREFIX: Final = "/v1/usage/"
_ERROR_BODY_LIMIT: Final = 64 << 10
_PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"
_ALGO_MESSAGE: Final = f"signing_algo must be {' or '.join(repr(a) for a in SIGNING_ALGOS)}"


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a handler sees it; `send` is already observed for metrics."""

    services: Services
    app: ASGIApp
    scope: Scope
    receive: Receive
    send: Send
    observed: Observed

    def query(self) -> dict[str, str]:
        """First value of each query parameter; malformed encodings are ignored, not fatal."""
        raw = self.scope.get("query_string", b"").decode("latin-1")
        return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}


Handler = Callable[[Request], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    """One row of the route table: a path (or a path prefix), its methods and its handler."""

    path: str
    methods: frozenset[str]
    handler: Handler
    name: str  # the `route` label of the metrics
    public: bool = False  # answered without the bearer token (load balancers probe /health)
    prefix: bool = False


class RouteTable:
    """Exact paths by dictionary, prefixes in table order: `match` is O(1) for every hot route."""

    def __init__(self, table: tuple[Route, ...]) -> None:
        self.exact = {r.path: r for r in table if not r.prefix}
        self.prefixes = tuple(r for r in table if r.prefix)

    def match(self, path: str) -> Route | None:
        route = self.exact.get(path)
        if route is None:
            route = next((r for r in self.prefixes if path.startswith(r.path)), None)
        return route


async def check_model_param(req: Request) -> bool:
    """Refuse a `model` query parameter that names a model this server does not serve."""
    model = req.query().get("model")
    if model is None:
        return True
    names = await req.services.models.names(req.app, req.scope)
    if names is not None and model in names:
        return True
    req.services.metrics.gate_rejections.labels("model_not_confidential").inc()
    await send_error(
        req.send,
        400,
        f"model {model[:200]!r} is not served by this confidential server",
        code="model_not_confidential",
        param="model",
    )
    return False


async def signature(req: Request) -> None:
    completion_id = req.scope["path"][len(SIGNATURE_PREFIX) :]
    algo = parse_signing_algo(req.query().get("signing_algo", "ecdsa"))
    if algo is None:
        await send_error(req.send, 400, _ALGO_MESSAGE, param="signing_algo")
        return
    if not await check_model_param(req):
        return
    store = req.services.store
    record = await store.get(completion_id) if is_storable_id(completion_id) else None
    if record is None:
        await send_error(
            req.send, 404, f"no signature for completion {completion_id[:64]!r}", code="signature_not_found"
        )
        return
    payload: dict[str, object] = {"text": record.text, "signing_algo": algo}
    if algo == "ecdsa":
        payload["signature"] = record.ecdsa.hex()
        payload["signing_address"] = record.signing_address
    else:
        payload["signature"] = record.ed25519.hex()
        payload["signing_public_key"] = record.ed25519_public_key.hex()
    # The node's signed token counts for this completion, once recorded (usage.py, metering.py).
    usage = await req.services.usage.get(completion_id)
    if usage is not None:
        payload.update(usage.fields(algo))
    await send_json(req.send, 200, json.dumps(payload, separators=(",", ":")).encode())


async def usage_by_ref(req: Request) -> None:
    """The signed usage of the completion a gateway forwarded under ``X-Tee-Usage-Ref: <ref>``.

    How a billing gateway learns what it forwarded, even for an encrypted body it cannot read.
    """
    ref = req.scope["path"][len(USAGE_PREFIX) :]
    algo = parse_signing_algo(req.query().get("signing_algo", "ecdsa"))
    if algo is None:
        await send_error(req.send, 400, _ALGO_MESSAGE, param="signing_algo")
        return
    record = await req.services.usage.get_by_ref(ref) if is_storable_id(ref) else None
    if record is None:
        await send_error(req.send, 404, f"no usage under ref {ref[:64]!r} (yet)", code="usage_not_found")
        return
    payload = {"id": record.usage.completion_id, "signing_algo": algo, **record.fields(algo)}
    await send_json(req.send, 200, json.dumps(payload, separators=(",", ":")).encode())


async def attestation_report(req: Request) -> None:
    params = req.query()
    try:
        nonce = parse_nonce(params.get("nonce"))
    except ValueError as exc:
        await send_error(req.send, 400, str(exc), param="nonce", code="invalid_nonce")
        return
    algo = parse_signing_algo(params.get("signing_algo", "ecdsa"))
    if algo is None:
        await send_error(req.send, 400, _ALGO_MESSAGE, param="signing_algo")
        return
    tls_flag = params.get("include_tls_fingerprint", "false").lower()
    if tls_flag not in ("true", "false"):
        await send_error(
            req.send, 400, "include_tls_fingerprint must be true or false", param="include_tls_fingerprint"
        )
        return
    if tls_flag == "true" and req.services.keys.tls is None:
        await send_error(
            req.send, 400, "this server serves no TLS (--tls off): no fingerprint to include",
            param="include_tls_fingerprint", code="tls_off",
        )  # fmt: skip
        return
    if not await check_model_param(req):
        return
    try:
        report = await req.services.attestation.report(nonce, algo, tls_layout=tls_flag == "true")
    except ReportBusy as exc:
        await send_error(req.send, 503, str(exc), code="busy", extra_headers=[(b"retry-after", b"1")])
        return
    except TrustRootError as exc:
        await send_error(req.send, 503, f"attestation is unavailable: {exc}", code="attestation_unavailable")
        return
    await send_json(req.send, 200, report.to_json())


async def models(req: Request) -> None:
    """The engine's model list, with each served base model marked confidential."""
    timeout = req.services.config.engine_timeout_s
    status, _, body = await call_app(
        req.app, req.scope, "GET", "/v1/models", limit=1 << 20, timeout_s=timeout
    )
    if status != 200:
        await send_normalized_error(req.send, status if status >= 400 else 502, body)
        return
    try:
        listing = json.loads(body)
        entries = listing["data"]
        if not isinstance(entries, list):
            raise TypeError("data is not a list")
    except (ValueError, KeyError, TypeError, RecursionError):
        await send_error(req.send, 502, "the engine returned an unreadable model list")
        return
    known = await req.services.models.names(req.app, req.scope)
    info = req.services.model_info()
    for entry in entries:
        if isinstance(entry, dict) and known is not None and entry.get("id") in known:
            entry["confidential_compute"] = True
            entry.update(info)
    listing["data"] = [e for e in entries if isinstance(e, dict) and e.get("confidential_compute")]
    await send_json(req.send, 200, json.dumps(listing, separators=(",", ":")).encode())


async def metrics(req: Request) -> None:
    """The engine's own metrics (vLLM's, when in-process or proxied) followed by ours."""
    timeout = req.services.config.engine_timeout_s
    status, _, engine_text = await call_app(
        req.app, req.scope, "GET", "/metrics", limit=16 << 20, timeout_s=timeout
    )
    body = (engine_text if status == 200 else b"") + req.services.metrics.render()
    await _send_body(req.send, 200, _PROMETHEUS_TEXT, body)


async def health(req: Request) -> None:
    """200 (empty, as vLLM answers) while the engine says it is healthy, else a 503 envelope."""
    timeout = req.services.config.engine_timeout_s
    status, _, _ = await call_app(req.app, req.scope, "GET", "/health", limit=64 << 10, timeout_s=timeout)
    if status != 200:
        message = "the engine did not answer in time" if status == 504 else "the engine is not healthy"
        await send_error(
            req.send, 503, message, code="engine_unavailable", extra_headers=[(b"retry-after", b"1")]
        )
        return
    await _send_body(req.send, 200, b"application/json", b"")


async def not_available(req: Request) -> None:
    await send_error(req.send, 503, "this endpoint is not offered by the confidential server")


async def engine(req: Request) -> None:
    """A route the engine answers itself (`/version`): its errors become the envelope."""
    normalizer = ErrorNormalizer(req.send)
    with anyio.move_on_after(req.services.config.engine_timeout_s) as waited:
        await req.app(req.scope, req.receive, normalizer.send_normalized)
    if waited.cancelled_caught and not normalizer.started:
        await send_error(req.send, 504, "the engine did not answer in time", code="engine_timeout")


class ErrorNormalizer:
    """Passes a response through, rewriting an error body into the one envelope."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.start: Message | None = None
        self.started = False
        self.error_body = bytearray()

    async def send_normalized(self, message: Message) -> None:
        if message["type"] == "http.response.start" and int(message["status"]) >= 400:
            self.start = message
            return
        self.started = True
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.error_body += message.get("body", b"")
        if len(self.error_body) > _ERROR_BODY_LIMIT:
            # Not an error document we could rewrite; drop it rather than leak a trace.
            self.error_body = bytearray(b"{}")
        if not message.get("more_body", False):
            await send_normalized_error(self.send, int(self.start["status"]), bytes(self.error_body))


async def _send_body(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode("ascii"))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def tls_csr(req: Request) -> None:
    """The CSR for this boot's TLS key (--tls files): take it to a CA; the key never moves."""
    tls = req.services.keys.tls
    if tls is None or tls.csr_pem is None:
        await send_error(
            req.send, 404, "no certificate request: the server is not in --tls files mode", code="no_csr"
        )
        return
    await _send_body(req.send, 200, b"application/pkcs10; charset=us-ascii", tls.csr_pem)


async def tls_certificate(req: Request) -> None:
    """Install the CA's chain for this server's key (--tls files); new connections present it."""
    tls = req.services.keys.tls
    if tls is None or tls.csr_pem is None:
        await send_error(req.send, 404, "certificates are installed only in --tls files mode", code="no_csr")
        return
    if req.services.api_key is None:
        # Without a token anyone who reaches the port could swap in a chain of their choosing
        # (for the same key, so not a takeover, but an outage or a misleading CA).
        await send_error(
            req.send, 403, "installing a certificate needs an API token (--api-key-env)", code="forbidden"
        )
        return
    try:
        body = await read_body(req.receive, 256 << 10)
    except BodyTooLarge:
        await send_error(req.send, 413, "a certificate chain is at most 256 KiB")
        return
    if body is None:
        return
    try:
        tls.install(body)
    except ConfigError as exc:
        await send_error(req.send, 400, str(exc), code="certificate_refused")
        return
    fingerprint = tls.spki_sha256.hex()
    await send_json(
        req.send, 200, json.dumps({"installed": True, "tls_cert_fingerprint": fingerprint}).encode()
    )


async def hpke_keys(req: Request) -> None:
    """The body-encryption key as EHBP clients fetch it; trust it only as the report attests it."""
    config = key_config(public_bytes(req.services.keys.e2ee.public_key()))
    await _send_body(req.send, 200, KEYS_MEDIA_TYPE, config)
