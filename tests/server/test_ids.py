"""Completion ids are the server's: no client can choose, replace, evict or hide another's signature.

vLLM (and the fake engine, faithfully) builds the id from `X-Request-Id` or the body's
`request_id`; the signing layer strips the one and refuses the other before the engine sees
them, and the store never replaces a record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anyio
import httpx
import pytest

from support.servers import running
from support.signed_client import signed_completion
from tee_inference.asgi import Receive, Scope, Send
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.engines.proxy import create_proxy_app
from tee_inference.middleware import SigningMiddleware
from tee_inference.services import Services
from tee_inference.signing import CompletionSignature
from tee_inference.store import MemorySignatureStore, is_storable_id

MODEL = "fake-model"
CHAT = {"messages": [{"role": "user", "content": "victim's prompt"}], "max_tokens": 6}


class CountingEngine:
    """The fake engine, counting the completion requests that reach it and what they carried."""

    def __init__(self) -> None:
        self.engine = FakeEngine(MODEL)
        self.bodies: list[bytes] = []
        self.request_ids: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("completions"):
            self.request_ids += [v for k, v in scope["headers"] if k == b"x-request-id"]
            message = await receive()
            self.bodies.append(message.get("body", b""))
            delivered = False

            async def replay() -> dict:  # type: ignore[type-arg]
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return message  # type: ignore[return-value]
                return await receive()  # type: ignore[return-value]

            await self.engine(scope, replay, send)
            return
        await self.engine(scope, receive, send)


@pytest.fixture(params=["direct", "proxied"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Services, CountingEngine]]:
    services = boot(ServerConfig.build(served_models=(MODEL,)))
    engine = CountingEngine()
    if request.param == "direct":
        with running(SigningMiddleware(engine, services=services)) as url:
            yield url, services, engine
    else:
        with (
            running(engine) as engine_url,
            running(SigningMiddleware(create_proxy_app(engine_url), services=services)) as url,
        ):
            yield url, services, engine


@pytest.mark.parametrize("stream", [False, True])
def test_x_request_id_cannot_choose_or_replace_an_id(
    served: tuple[str, Services, CountingEngine], stream: bool
) -> None:
    url, _, engine = served
    with httpx.Client(base_url=url) as client:
        victim = signed_completion(
            client,
            "/v1/chat/completions",
            {**CHAT, "stream": stream},
            MODEL,
            headers={"x-request-id": "shared"},
        )
        attacker = signed_completion(
            client,
            "/v1/chat/completions",
            {**CHAT, "stream": stream, "max_tokens": 3},
            MODEL,
            headers={"x-request-id": "shared"},
        )
        assert victim.completion_id != attacker.completion_id
        assert "shared" not in victim.completion_id
        # The victim's signature is still its own (signed_completion checked it at the time; again now).
        stored = client.get(f"/v1/signature/{victim.completion_id}").json()
        assert stored["text"] == victim.text
    assert engine.request_ids == []  # the header never reaches the engine


@pytest.mark.parametrize("request_id", ["shared", "a/b c", "x" * 300, 7, None])
def test_body_request_id_is_refused_before_the_engine(
    served: tuple[str, Services, CountingEngine], request_id: object
) -> None:
    url, _, engine = served
    body = json.dumps({"model": MODEL, **CHAT, "request_id": request_id}).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "request_id_not_allowed" and error["param"] == "request_id"
    assert r.headers["x-should-retry"] == "false"
    assert engine.bodies == []


def test_the_engine_sees_the_exact_bytes_that_were_hashed(
    served: tuple[str, Services, CountingEngine],
) -> None:
    url, _, engine = served
    with httpx.Client(base_url=url) as client:
        signed = signed_completion(
            client,
            "/v1/completions",
            {"prompt": "bytes", "max_tokens": 2},
            MODEL,
            headers={"X-Request-Id": "mine"},
        )
    assert engine.bodies == [signed.raw_request]


def _sig(n: int) -> CompletionSignature:
    return CompletionSignature(text=f"{n:064x}:{n:064x}", ecdsa=b"e" * 65, ed25519=b"d" * 64,
                               signing_address="0x" + "ab" * 20, ed25519_public_key=b"k" * 32)  # fmt: skip


def test_the_store_never_replaces_a_record() -> None:
    async def scenario() -> None:
        collisions: list[str] = []
        store = MemorySignatureStore(
            ttl_s=1800, max_entries=10, max_bytes=1 << 20, on_collision=collisions.append
        )
        assert await store.put("chatcmpl-a", _sig(1)) is True
        assert await store.put("chatcmpl-a", _sig(2)) is False
        assert await store.get("chatcmpl-a") == _sig(1)
        assert collisions == ["chatcmpl-a"] and len(store) == 1

    anyio.run(scenario)


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "x" * 257, "é", "-leading", "chatcmpl-\n"])
def test_ids_that_could_not_be_fetched_are_never_stored(bad: str) -> None:
    assert not is_storable_id(bad)

    async def scenario() -> None:
        store = MemorySignatureStore(ttl_s=1800, max_entries=10, max_bytes=1 << 20)
        assert await store.put(bad, _sig(1)) is False
        assert len(store) == 0 and store.bytes_used == 0

    anyio.run(scenario)


def test_vllm_ids_are_storable() -> None:
    for good in ("chatcmpl-9f1c2b3a4d5e6f70", "cmpl-0123456789abcdef", "chatcmpl-" + "f" * 247):
        assert is_storable_id(good)


def test_an_id_that_cannot_be_stored_is_counted_not_signed_into_the_void() -> None:
    """An engine that produced an unfetchable id: the client still gets its bytes, the metric says so."""
    services = boot(ServerConfig.build(served_models=(MODEL,)))

    async def go() -> httpx.Response:
        app = SigningMiddleware(FakeEngine(MODEL), services=services)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            # The fake engine, like vLLM, would take this header; the layer strips it, so it never matters.
            return await c.post("/v1/chat/completions", json={"model": MODEL, **CHAT},
                                headers={"x-request-id": "a/b"})  # fmt: skip

    r = anyio.run(go)
    assert r.status_code == 200 and "/" not in r.json()["id"]
