"""The standalone proxy: honest metrics and logs, and bounded waits on an engine that never answers."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from support.servers import running
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.engines.proxy import create_proxy_app
from tee_inference.middleware import SigningMiddleware

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}


def test_successful_proxied_completions_are_not_counted_as_disconnects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    services = boot(ServerConfig.build(served_models=(MODEL,)))
    caplog.set_level(logging.INFO, logger="tee_inference")
    with (
        running(FakeEngine(MODEL)) as engine,
        running(SigningMiddleware(create_proxy_app(engine), services=services)) as url,
    ):
        with httpx.Client(base_url=url) as client:
            for stream in (False, True) * 10:
                r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                assert r.status_code == 200
    assert services.metrics.unsigned.labels("client_disconnected")._value.get() == 0
    assert services.metrics.signatures._value.get() == 20
    assert not [r for r in caplog.records if "disconnect" in r.getMessage()]


@pytest.fixture
def silent_upstream() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a wedged engine)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        listener.close()
        for conn in held:
            conn.close()


def _concurrently(
    url: str, n: int, method: str, path: str, **kw: object
) -> list[tuple[httpx.Response, float]]:
    async def one(client: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        r = await client.request(method, path, **kw)  # type: ignore[arg-type]
        return r, time.monotonic() - started

    async def go() -> list[tuple[httpx.Response, float]]:
        results: list[tuple[httpx.Response, float]] = []
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:

            async def run() -> None:
                results.append(await one(client))

            async with anyio.create_task_group() as tasks:
                for _ in range(n):
                    tasks.start_soon(run)
        return results

    return anyio.run(go)


def test_model_discovery_on_a_silent_engine_is_bounded_and_holds_no_lock(silent_upstream: str) -> None:
    services = boot(ServerConfig.build(engine_timeout_s=1.0))  # no served models: discovered
    with running(SigningMiddleware(create_proxy_app(silent_upstream), services=services)) as url:
        results = _concurrently(url, 5, "POST", "/v1/chat/completions", json=CHAT)
        for r, took in results:
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "engine_unavailable"
            assert "retry-after" in r.headers
            assert took < 3.5, took  # one bound, not one bound per waiter
        started = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=20)
        assert health.status_code == 503 and time.monotonic() - started < 3.5
        assert httpx.get(f"{url}/v1/models", timeout=20).status_code in (502, 503, 504)


def test_a_silent_engine_times_out_a_completion_with_an_envelope(silent_upstream: str) -> None:
    services = boot(
        ServerConfig.build(served_models=(MODEL,), engine_timeout_s=1.0, engine_response_timeout_s=1.0)
    )
    with running(
        SigningMiddleware(create_proxy_app(silent_upstream, response_timeout_s=1.0), services=services)
    ) as url:
        started = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=20)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "engine_timeout"
        assert time.monotonic() - started < 3.5


def test_discovery_recovers_when_the_engine_comes_up() -> None:
    from support.servers import free_port

    port = free_port()
    services = boot(ServerConfig.build(engine_timeout_s=1.0))
    with running(SigningMiddleware(create_proxy_app(f"http://127.0.0.1:{port}"), services=services)) as url:
        down = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=20)
        assert down.status_code == 503
        assert httpx.get(f"{url}/health").status_code == 503
        with running(FakeEngine(MODEL), port=port):
            assert httpx.get(f"{url}/health").status_code == 200
            time.sleep(1.1)  # a failed discovery is reused for a second (a down engine costs nothing)
            assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=20).status_code == 200
