"""Simulated nodes and gateways on loopback, for the scale-out tests.

Each node is a whole server (its own boot, key and simulated CVM) in front of the fake engine,
wrapped in a ``Watched`` app that records what reached it: the completions (and their headers),
and the nonces it was asked reports for, in order.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from support.servers import free_port, running
from support.simulated_report import simulated_server_expectations
from tee_inference.asgi import ASGIApp, Message, Receive, Scope, Send
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.gateway.app import GatewayApp
from tee_inference.gateway.config import GatewayConfig
from tee_inference.middleware import SigningMiddleware
from tee_inference.services import Services

MODEL = "fake-model"


@dataclass
class Watched:
    """An app that records the requests it gets before passing them on."""

    app: ASGIApp
    events: list[tuple[str, float, Any]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path in ("/v1/chat/completions", "/v1/completions"):
                self.events.append(("completion", time.monotonic(), dict(scope["headers"])))
            elif path == "/v1/attestation/report" and b"nonce=" in scope.get("query_string", b""):
                self.events.append(("report", time.monotonic(), scope["query_string"]))
        await self.app(scope, receive, send)

    @property
    def completions(self) -> list[dict[bytes, bytes]]:
        return [headers for kind, _, headers in self.events if kind == "completion"]


@dataclass
class RunningNode:
    url: str
    port: int
    services: Services
    watched: Watched

    @property
    def address(self) -> str:
        return self.services.signer.ecdsa.address


def node_app(services: Services, wrap: Callable[[ASGIApp], ASGIApp] | None = None) -> Watched:
    app: ASGIApp = SigningMiddleware(FakeEngine(MODEL), services=services)
    return Watched(wrap(app) if wrap else app)


@contextmanager
def node(
    *,
    port: int | None = None,
    wrap: Callable[[ASGIApp], ASGIApp] | None = None,
    tls: bool = False,
    **config: Any,
) -> Iterator[RunningNode]:
    """A simulated node of its own boot; ``config`` overrides its ServerConfig. With ``tls`` it
    serves https with its boot's self-signed key, as `serve --tls self-signed` does."""
    settings: dict[str, Any] = {"served_models": (MODEL,), "model_weights_root": FakeEngine.weights_root()}
    if tls:
        settings["tls"] = "self-signed"
    services = boot(ServerConfig.build(**{**settings, **config}))
    watched = node_app(services, wrap)
    port = port or free_port()
    context = None
    if services.keys.tls is not None:
        services.keys.tls.write_files(None, require_ram=False)
        context = services.keys.tls.serve_context()
    try:
        with running(watched, port=port, ssl_context=context) as url:
            yield RunningNode(url, port, services, watched)
    finally:
        if services.keys.tls is not None:
            services.keys.tls.close()


def expected_file(directory: Path) -> Path:
    path = directory / "expected.json"
    path.write_text(json.dumps(simulated_server_expectations({MODEL: FakeEngine.weights_root()})))
    return path


def gateway_config(urls: list[str], directory: Path, **overrides: Any) -> GatewayConfig:
    values: dict[str, Any] = {
        "nodes": tuple(urls), "expect": (expected_file(directory),), "allow_simulated": True,
        "allow_plaintext": True, "probe_s": 0.2, "retry_s": 0.2, "outbox": directory / f"outbox-{os.urandom(4).hex()}.db",
    }  # fmt: skip
    return GatewayConfig.build(**{**values, **overrides})


@contextmanager
def gateway(config: GatewayConfig, *, wait_for: int | None = None) -> Iterator[tuple[str, GatewayApp]]:
    """A gateway on loopback; waits until ``wait_for`` nodes (default: all) are verified."""
    app = GatewayApp(config)
    with running(app) as url:
        want = len(config.nodes) if wait_for is None else wait_for
        deadline = time.monotonic() + 20
        while len(app.pool.verified()) < want:
            if time.monotonic() > deadline:
                states = {n.url: (n.state, n.problem) for n in app.pool.nodes}
                raise AssertionError(f"nodes not verified in time: {states}")
            time.sleep(0.02)
        yield url, app


def chat(client: httpx.Client, content: str = "hello", **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}
    return client.post("/v1/chat/completions", content=json.dumps(body).encode(),
                       headers={"content-type": "application/json"})  # fmt: skip


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class NonceSwapper:
    """A node that answers a report for a nonce of its own choosing, relabelled as the caller's:
    report_data then binds another nonce than the one the report claims (a replayed quote)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = scope.get("query_string", b"")
        if scope["type"] != "http" or scope["path"] != "/v1/attestation/report" or b"nonce=" not in query:
            await self.app(scope, receive, send)
            return
        asked = query.split(b"nonce=")[1][:64].decode()
        other = os.urandom(32).hex()
        scope = {**scope, "query_string": query.replace(asked.encode(), other.encode())}
        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        report = json.loads(b"".join(chunks))
        for entry in (report, *report.get("all_attestations", [])):
            entry["request_nonce"] = asked  # the claim only: the quote still binds `other`
        body = json.dumps(report).encode()
        headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
