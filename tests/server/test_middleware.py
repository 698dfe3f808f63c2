"""The middleware at the ASGI level: chunking, engine failures, held-body overflow, disconnects."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import anyio
import httpx
import pytest

from support.scripted import REQUEST, _stream_body, scripted_engine
from support.servers import running
from tee_inference.asgi import ASGIApp, Receive, Scope, Send
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine, _Reply
from tee_inference.engines.proxy import create_proxy_app
from tee_inference.middleware import SigningMiddleware
from tee_inference.services import Services
from tee_inference.signing import recover_ecdsa_address
from tee_inference.store import MemorySignatureStore

MODEL = "fake-model"


def _call(app: ASGIApp, request: bytes = REQUEST) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(
                "/v1/chat/completions", content=request, headers={"content-type": "application/json"}
            )

    return anyio.run(go)


def _stored(services: Services, completion_id: str):  # type: ignore[no-untyped-def]
    return anyio.run(services.store.get, completion_id)


def _services(**config: object) -> Services:
    return boot(ServerConfig.build(served_models=(MODEL,), **config))


def test_every_split_of_the_stream_signs_the_same_bytes() -> None:
    body = _stream_body()
    services = _services()
    want_text = f"{hashlib.sha256(REQUEST).hexdigest()}:{hashlib.sha256(body).hexdigest()}"
    for cut in range(len(body) + 1):
        services.store = MemorySignatureStore(
            ttl_s=1800, max_entries=10, max_bytes=1 << 20
        )  # ids never repeat
        parts = [p for p in (body[:cut], body[cut:]) if p]
        response = _call(SigningMiddleware(scripted_engine(parts), services=services))
        assert response.content == body
        record = _stored(services, "chatcmpl-feedbeef")
        assert record is not None and record.text == want_text, cut


def test_whole_stream_in_one_message_and_one_byte_messages() -> None:
    body = _stream_body()
    for parts in ([body], [body[i : i + 1] for i in range(len(body))]):
        services = _services()
        response = _call(SigningMiddleware(scripted_engine(parts), services=services))
        assert response.content == body
        record = _stored(services, "chatcmpl-feedbeef")
        assert record is not None
        assert recover_ecdsa_address(record.text, record.ecdsa) == services.signer.ecdsa.address


def test_engine_failure_mid_stream_ends_with_a_signed_error_event() -> None:
    body = _stream_body()
    events = [e + b"\n\n" for e in body.split(b"\n\n") if e]
    services = _services()
    response = _call(SigningMiddleware(scripted_engine(events, fail_after=2), services=services))
    assert response.status_code == 200
    last = response.content.rstrip(b"\n").split(b"\n\n")[-1]
    assert last.startswith(b"data: ")
    assert json.loads(last[6:])["error"]["code"] == "engine_error"
    assert b"[DONE]" not in response.content
    record = _stored(services, "chatcmpl-feedbeef")
    assert record is not None
    assert record.text.endswith(hashlib.sha256(response.content).hexdigest())


def test_engine_failure_before_the_response_is_a_500_envelope() -> None:
    services = _services()
    response = _call(SigningMiddleware(scripted_engine([b"x"], content_type=b"application/json", fail_after=0),
                                       services=services))  # fmt: skip
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "engine_error"


def test_body_too_big_to_hold_is_streamed_and_still_signed() -> None:
    reply = _Reply(completion_id="chatcmpl-big", created=1, model=MODEL, chat=True,
                   tokens=["word "] * 3000, finish="stop", prompt_tokens=1)  # fmt: skip
    body = json.dumps(reply.whole(), separators=(",", ":")).encode()
    parts = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    services = _services(max_held_response_bytes=4096)
    response = _call(
        SigningMiddleware(scripted_engine(parts, content_type=b"application/json"), services=services)
    )
    assert response.content == body
    assert "x-signature" not in response.headers and response.headers["x-signing-address"]
    record = _stored(services, "chatcmpl-big")
    assert record is not None and record.text.endswith(hashlib.sha256(body).hexdigest())


class _Watched:
    """Wraps an engine to see whether a response ran to its end or was cut off."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.outcomes: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        ended = False

        async def watched_send(message: dict) -> None:  # type: ignore[type-arg]
            nonlocal ended
            ended = ended or (message["type"] == "http.response.body" and not message.get("more_body"))
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            self.outcomes.append("completed" if ended else "aborted")


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("proxied", [False, True])
def test_client_disconnect_cancels_the_engine_request(proxied: bool) -> None:
    engine = _Watched(FakeEngine(MODEL, token_delay_s=0.05))
    services = _services()
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "long"}],
        "stream": True,
        "max_tokens": 400,
        "ignore_eos": True,
    }
    with running(engine) as engine_url:
        front = create_proxy_app(engine_url) if proxied else engine
        with running(SigningMiddleware(front, services=services)) as url:
            started = time.monotonic()
            with (
                httpx.Client(base_url=url) as client,
                client.stream("POST", "/v1/chat/completions", json=request) as r,
            ):
                next(r.iter_raw())
            # 400 tokens at 50 ms would take 20 s; the engine must stop long before.
            assert _wait_for(lambda: bool(engine.outcomes), 5), "engine request still running"
            assert engine.outcomes == ["aborted"]
            assert time.monotonic() - started < 6
    assert services.metrics.unsigned.labels("client_disconnected")._value.get() >= 0
