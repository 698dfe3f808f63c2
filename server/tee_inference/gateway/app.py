"""The gateway: many attested nodes behind one endpoint, without giving up verification.

    client ──▶ GatewayApp (pure ASGI)
                 ROUTES: one row per route (path or prefix, methods, handler, public?)
                 match → API key (401) → 404/405 → handler
                 completions: rate limit (429) → verified node for the model, else 400
                   model_not_confidential (no node is asked) → bytes forwarded both ways (forward.py)
                 /v1/attestation/report: every verified node's report for the caller's nonce,
                   as all_attestations; /v1/signature/{id}: any node's, naming it; /v1/models
               NodePool (nodes.py): verify, pin, probe, re-verify · Outbox + Reporter (outbox.py)

Nothing the gateway answers about a node is its own claim: reports are the nodes' (verified again
here, and by the client), signatures are served only when they verify under a key the gateway
verified. Other modalities are 503 ``not_available``; there is no fallback to anything unattested.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs

import anyio
import anyio.to_thread
import httpx

from tee_inference.asgi import Message, Receive, Scope, Send, header
from tee_inference.envelope import send_error, send_json
from tee_inference.gateway.answers import SIGNATURE_PREFIX, NodeAnswers
from tee_inference.gateway.config import ApiKeys, Caller, GatewayConfig
from tee_inference.gateway.forward import Forwarder, read_body_within, routing_model
from tee_inference.gateway.limits import RateLimiter
from tee_inference.gateway.metrics import GatewayMetrics
from tee_inference.gateway.nodes import Node, NodePool
from tee_inference.gateway.outbox import Outbox, Reporter, UsageSink
from tee_inference.redis_kv import RedisKV
from tee_inference.reports import parse_nonce
from tee_inference.signing import parse_signing_algo
from tee_inference.store import is_storable_id
from tee_inference.verify.measurements import load_expected_measurements
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.verifier import Verifier

log = logging.getLogger("tee_inference.gateway")

GET, POST, ANY = frozenset({"GET"}), frozenset({"POST"}), frozenset[str]()


@dataclass(frozen=True, slots=True)
class Request:
    scope: Scope
    receive: Receive
    send: Send
    caller: Caller

    def query(self) -> dict[str, str]:
        raw = self.scope.get("query_string", b"").decode("latin-1")
        return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    methods: frozenset[str]
    handler: Callable[[GatewayApp, Request], Awaitable[None]]
    name: str
    public: bool = False
    prefix: bool = False


def policy_for(config: GatewayConfig) -> VerificationPolicy:
    """What a node must prove, from the command line: the verifier's policy, as `verify url` builds it."""
    relax = {"measurements"} if config.no_measurements else set()
    if config.allow_missing_collateral:
        relax.add("tcb_status")
    return VerificationPolicy.build(
        expected=[load_expected_measurements(p) for p in config.expect],
        allow_simulated=config.allow_simulated,
        relax=relax,
    )


class GatewayApp:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        verifier: Verifier | None = None,
        policy: VerificationPolicy | None = None,
    ) -> None:
        self.config = config
        self.keys = ApiKeys(config.requests_per_minute, config.keys_file)
        self.redis = RedisKV(config.redis_url) if config.redis_url else None
        token = config.node_token()
        self.policy = policy or policy_for(config)
        self.pool = NodePool(
            config,
            verifier or Verifier.production(),
            self.policy,
            node_headers={"authorization": f"Bearer {token}"} if token else {},
        )
        self.limiter = RateLimiter(self.redis)
        self.outbox = Outbox(config.outbox)
        usage_log = config.usage_log or config.outbox.with_name(config.outbox.name + ".usage.jsonl")
        sink = UsageSink(self.redis, None if self.redis else usage_log)
        self.reporter = Reporter(self.outbox, sink, self._client_for, wait_s=config.usage_wait_s)
        self.forwarder = Forwarder(self.pool, self.outbox, response_timeout_s=config.response_timeout_s)
        self.metrics = GatewayMetrics(self.pool, self.outbox, self.reporter)
        self.answers = NodeAnswers(config, self.pool, self.policy, self.redis, self.metrics)
        self.exact = {r.path: r for r in ROUTES if not r.prefix}
        self.prefixes = tuple(r for r in ROUTES if r.prefix)

    def _client_for(self, url: str) -> httpx.AsyncClient | None:
        return next((n.client for n in self.pool.nodes if n.url == url), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope["path"]
        route = self.exact.get(path) or next((r for r in self.prefixes if path.startswith(r.path)), None)
        status = 0

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._dispatch(route, scope, receive, observed)
        except Exception as exc:
            log.error(
                "gateway request to %s failed: %s", route.name if route else "unknown", type(exc).__name__
            )
            if status == 0:
                await send_error(observed, 500, "internal error", code="internal_error")
        finally:
            self.metrics.requests.labels(route.name if route else "unknown", str(status or 499)).inc()

    async def _dispatch(self, route: Route | None, scope: Scope, receive: Receive, send: Send) -> None:
        caller = self.keys.caller(header(scope, b"authorization"))
        if caller is None and (route is None or not route.public):
            await send_error(
                send, 401, "missing or invalid API key", extra_headers=[(b"www-authenticate", b"Bearer")]
            )
            return
        if route is None:
            await send_error(send, 404, f"no route {scope['path'][:200]!r}")
            return
        if route.methods and scope["method"] not in route.methods:
            allow = ", ".join(sorted(route.methods)).encode()
            await send_error(
                send,
                405,
                f"method {scope['method'][:20]!r} is not allowed here",
                extra_headers=[(b"allow", allow)],
            )
            return
        await route.handler(self, Request(scope, receive, send, caller or Caller(None, 0)))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Node verification and usage reporting run for as long as the server does."""
        await receive()  # lifespan.startup
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self.pool.run)
            tasks.start_soon(self.reporter.run)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            tasks.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self.reporter.step()  # what finished before shutdown is reported now, if it can be
            await self.pool.aclose()
            if self.redis is not None:
                await self.redis.aclose()
        self.outbox.close()
        await send({"type": "lifespan.shutdown.complete"})

    # -- handlers --------------------------------------------------------------------------

    async def completion(self, req: Request) -> None:
        body = await read_body_within(req.receive, self.config.max_request_bytes, self.config.body_timeout_s)
        if body is None:
            return
        if isinstance(body, int):
            message = "request body too large" if body == 413 else "the request body did not arrive in time"
            await send_error(req.send, body, message, extra_headers=[(b"connection", b"close")])
            return
        model = routing_model(req.scope, body)
        if model is None:
            await send_error(
                req.send,
                400,
                "'model' is required (in the body, or X-Tee-Model for an encrypted body)",
                param="model",
            )
            return
        verdict = await self.limiter.hit(req.caller)
        if not verdict.allowed:
            self.metrics.rate_limited.inc()
            await send_error(
                req.send,
                429,
                f"rate limit of {verdict.limit} requests per minute reached",
                code="rate_limited",
                extra_headers=[(b"retry-after", str(verdict.reset_s).encode()), *verdict.headers()],
            )
            return
        await self.forwarder.forward(req.scope, req.receive, req.send, body, model, req.caller, verdict)

    async def report(self, req: Request) -> None:
        params = req.query()
        try:
            nonce = parse_nonce(params.get("nonce")) or os.urandom(32)
        except ValueError as exc:
            await send_error(req.send, 400, str(exc), param="nonce", code="invalid_nonce")
            return
        algo = parse_signing_algo(params.get("signing_algo", "ecdsa"))
        tls = params.get("include_tls_fingerprint", "false").lower()
        if algo is None or tls not in ("true", "false"):
            await send_error(
                req.send, 400, "signing_algo must be ecdsa or ed25519, include_tls_fingerprint true or false"
            )
            return
        model = params.get("model")
        nodes = self.pool.verified(model)
        if not nodes:
            code, status = ("model_not_confidential", 400) if model else ("no_verified_node", 503)
            await send_error(
                req.send,
                status,
                "no verified confidential node" + (f" serves {model[:200]!r}" if model else ""),
                code=code,
            )
            return
        found: list[dict[str, Any] | None] = [None] * len(nodes)

        async def one(index: int, node: Node) -> None:
            found[index] = await self.answers.report_of(node, nonce, algo, tls == "true" and node.secure)

        async with anyio.create_task_group() as tasks:
            for index, node in enumerate(nodes):
                tasks.start_soon(one, index, node)
        reports = [r for r in found if r is not None]
        if not reports:
            await send_error(
                req.send, 503, "no node answered a verifiable report", code="attestation_unavailable"
            )
            return
        answer = {**reports[0], "all_attestations": reports}
        await send_json(req.send, 200, json.dumps(answer, separators=(",", ":")).encode())

    async def signature(self, req: Request) -> None:
        completion_id = req.scope["path"][len(SIGNATURE_PREFIX) :]
        params = req.query()
        algo = parse_signing_algo(params.get("signing_algo", "ecdsa"))
        if algo is None:
            await send_error(req.send, 400, "signing_algo must be 'ecdsa' or 'ed25519'", param="signing_algo")
            return
        model = params.get("model")
        if model is not None and model not in self.pool.models():
            await send_error(
                req.send,
                400,
                f"model {model[:200]!r} is not served by a verified node",
                code="model_not_confidential",
                param="model",
            )
            return
        answer = None
        if is_storable_id(completion_id):
            answer = await self.answers.signature(completion_id, algo)
        if answer is None:
            await send_error(
                req.send,
                404,
                f"no signature for completion {completion_id[:64]!r}",
                code="signature_not_found",
            )
            return
        await send_json(req.send, 200, json.dumps(answer, separators=(",", ":")).encode())

    async def models(self, req: Request) -> None:
        data = []
        for name, nodes in sorted(self.pool.models().items()):
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "owned_by": "tee-inference",
                    "confidential_compute": True,
                    "nodes": len(nodes),
                    "simulated": any(n.identity.simulated for n in nodes if n.identity),
                }
            )
        await send_json(
            req.send, 200, json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()
        )

    async def health(self, req: Request) -> None:
        if not self.pool.verified():
            await send_error(
                req.send,
                503,
                "no verified node yet",
                code="no_verified_node",
                extra_headers=[(b"retry-after", b"1")],
            )
            return
        await send_json(req.send, 200, b"")

    async def metrics_route(self, req: Request) -> None:
        body = self.metrics.render()
        headers = [
            (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        await req.send({"type": "http.response.start", "status": 200, "headers": headers})
        await req.send({"type": "http.response.body", "body": body, "more_body": False})

    async def not_available(self, req: Request) -> None:
        await send_error(req.send, 503, "this endpoint is not offered by the confidential gateway")


ROUTES: Final[tuple[Route, ...]] = (
    Route("/v1/chat/completions", POST, GatewayApp.completion, "/v1/chat/completions"),
    Route("/v1/completions", POST, GatewayApp.completion, "/v1/completions"),
    Route("/v1/models", GET, GatewayApp.models, "/v1/models"),
    Route(SIGNATURE_PREFIX, GET, GatewayApp.signature, "signature", prefix=True),
    Route("/v1/attestation/report", GET, GatewayApp.report, "/v1/attestation/report"),
    Route("/metrics", GET, GatewayApp.metrics_route, "/metrics"),
    Route("/health", frozenset({"GET", "HEAD"}), GatewayApp.health, "/health", public=True),
    *(
        Route(prefix, ANY, GatewayApp.not_available, "not_available", prefix=True)
        for prefix in ("/v1/embeddings", "/v1/images", "/v1/audio", "/v1/moderations", "/v1/fine_tuning")
    ),
)
