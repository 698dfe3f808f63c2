"""The one route table: match, authorize unless public, 404/405, call — /health included."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import httpx
import pytest

from support.servers import running
from tee_inference.asgi import Receive, Scope, Send
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.middleware import ROUTES, RouteTable, SigningMiddleware
from tee_inference.routes import Route

MODEL = "fake-model"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTING_TOKEN", "tok")
        services = boot(ServerConfig.build(served_models=(MODEL,), api_key_env="ROUTING_TOKEN"))
        with running(SigningMiddleware(FakeEngine(MODEL), services=services)) as base:
            yield base


def test_every_row_is_reachable_and_unique() -> None:
    table = RouteTable(ROUTES)
    for route in ROUTES:
        probe = route.path + ("x" if route.prefix else "")
        assert table.match(probe) is route
    assert len({(r.path, r.prefix) for r in ROUTES}) == len(ROUTES)
    assert table.match("/v1/chat/completions/extra") is None  # exact rows do not match longer paths
    assert table.match("/") is None


def test_health_through_the_table(url: str) -> None:
    # Public: no token needed, for load balancers; HEAD works and has no body.
    get = httpx.get(f"{url}/health")
    assert get.status_code == 200
    head = httpx.head(f"{url}/health")
    assert head.status_code == 200 and head.content == b""
    post = httpx.post(f"{url}/health")
    assert post.status_code == 405
    assert post.json()["error"]["code"] == "method_not_allowed"
    assert post.headers["allow"] == "GET, HEAD"


def test_auth_comes_before_route_discovery(url: str) -> None:
    assert httpx.get(f"{url}/v1/nope").status_code == 401
    assert httpx.delete(f"{url}/v1/signature/x").status_code == 401
    assert httpx.get(f"{url}/v1/nope", headers={"authorization": "Bearer tok"}).status_code == 404


def test_health_reports_an_unhealthy_engine() -> None:
    async def sick_engine(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await FakeEngine()(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"dying", "more_body": False})

    services = boot(ServerConfig.build(served_models=(MODEL,)))

    async def go() -> httpx.Response:
        app = SigningMiddleware(sick_engine, services=services)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/health")

    r = anyio.run(go)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "engine_unavailable"
    assert b"dying" not in r.content


def test_a_route_is_one_row_and_one_handler() -> None:
    """What adding an endpoint takes: a handler and a row; auth, 404/405 and metrics come free."""
    from tee_inference.envelope import send_json

    async def hello(req: object) -> None:
        await send_json(req.send, 200, b'{"hello":true}')  # type: ignore[attr-defined]

    row = Route("/v1/hello", frozenset({"GET"}), hello, "/v1/hello")
    services = boot(ServerConfig.build(served_models=(MODEL,)))
    app = SigningMiddleware(FakeEngine(MODEL), services=services)
    app.routes = RouteTable((*ROUTES, row))

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/v1/hello"), await c.post("/v1/hello")

    ok, wrong = anyio.run(go)
    assert ok.json() == {"hello": True}
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
    assert b'route="/v1/hello"' in services.metrics.render()
