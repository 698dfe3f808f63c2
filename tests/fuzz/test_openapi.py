"""Schemathesis against the running server (fake engine, and behind the proxy), from docs/openapi.json.

Every answer must be a 2xx, or an error in the one envelope with a status the description
documents for that operation (5xx only where documented: a refused modality, an unavailable
engine or trust root). `make test` runs a bounded number of examples per operation; `make fuzz`
(marker `fuzz`) runs many more. The description also has to match the route table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from support.paths import REPO
from support.privacy import MARKER
from support.servers import running
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.engines.proxy import create_proxy_app
from tee_inference.middleware import ROUTES, SigningMiddleware
from tee_inference.transport import uvicorn_options

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

OPENAPI = REPO / "docs" / "openapi.json"
MODEL = "fake-model"
schema = schemathesis.openapi.from_path(OPENAPI)


@pytest.fixture(scope="module", params=["direct", "proxied"])
def base_url(request: pytest.FixtureRequest) -> Iterator[str]:
    config = ServerConfig.build(served_models=(MODEL,), max_request_bytes=64 << 10)
    services = boot(config)
    if request.param == "direct":
        with running(
            SigningMiddleware(FakeEngine(MODEL), services=services), **uvicorn_options(config)
        ) as url:
            yield url
    else:
        with (
            running(FakeEngine(MODEL)) as engine,
            running(
                SigningMiddleware(create_proxy_app(engine), services=services), **uvicorn_options(config)
            ) as url,
        ):
            yield url


def check(case: object, response: httpx.Response | None) -> None:
    if response is None:
        return
    operation = case.operation  # type: ignore[attr-defined]
    documented = {str(code) for code in operation.definition.raw.get("responses", {})}
    status = response.status_code
    assert status < 500 or str(status) in documented, f"{status} undocumented: {response.text[:300]}"
    assert "Traceback" not in response.text
    if status >= 400 and operation.method.upper() != "HEAD":
        assert response.headers["content-type"] == "application/json", response.text[:200]
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code", "status"}
        assert error["status"] == status and error["message"]
        assert MARKER not in error["message"]


def _call(case: object, url: str) -> httpx.Response | None:
    """The case over a real socket; None when the HTTP client itself refuses to send it."""
    kwargs = case.as_transport_kwargs(base_url=url)  # type: ignore[attr-defined]
    method, target = kwargs.pop("method"), kwargs.pop("url")
    content = kwargs.pop("data", None) or kwargs.pop("content", None)
    body = kwargs.pop("json", None)
    headers = kwargs.pop("headers", None) or {}
    params = kwargs.pop("params", None)
    try:
        with httpx.Client(timeout=30) as client:
            return client.request(method, target, content=content, json=body, headers=headers, params=params)
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        return None  # a header value no HTTP/1.1 client may send (httpx encodes headers as ASCII)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_2xx_or_a_documented_envelope(case: object, base_url: str) -> None:
    check(case, _call(case, base_url))


@pytest.mark.fuzz
@schema.parametrize()
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_2xx_or_a_documented_envelope_deep(case: object, base_url: str) -> None:
    check(case, _call(case, base_url))


def test_the_description_matches_the_route_table() -> None:
    paths = json.loads(OPENAPI.read_text())["paths"]
    for route in ROUTES:
        if route.prefix:
            assert any(p.startswith(route.path) for p in paths), route.path
        else:
            assert route.path in paths, route.path
            assert {m.upper() for m in paths[route.path]} == set(route.methods), route.path
    for path in paths:
        assert any(path == r.path or (r.prefix and path.startswith(r.path)) for r in ROUTES), path
