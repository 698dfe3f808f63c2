"""The request path's front: which routes exist, who may call them, and where each one goes.

`SigningMiddleware` is a pure ASGI middleware that works in both deployments:

- inside vLLM, through `vllm serve --middleware tee_inference.middleware.SigningMiddleware`
  (vLLM constructs it with the app alone, so it reads `ServerConfig` from the environment);
- in front of the standalone proxy or the fake engine, in `tee-inference serve`.

Read top to bottom: `ROUTES` is every route that exists; `SigningMiddleware.__call__` matches
one, checks the bearer token unless the route is public, and calls its handler. A completion
goes to a per-request `exchange.SignedExchange`, which reads, gates and admits the request and
signs the answer as it passes; the other handlers are in `routes.py`.
"""

from __future__ import annotations

import logging
from typing import Final

from tee_inference import routes
from tee_inference.asgi import ASGIApp, Receive, Scope, Send, header
from tee_inference.config import ServerConfig
from tee_inference.e2ee import KEYS_PATH
from tee_inference.envelope import send_error
from tee_inference.exchange import SignedExchange
from tee_inference.handoff import services_for_process
from tee_inference.observe import Observed, ensure_log_handler
from tee_inference.routes import RouteTable
from tee_inference.services import Services

log = logging.getLogger("tee_inference.middleware")

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
