"""Sign and store before the last bytes are released; the in-band signature for clients that ask.

A client that has `data: [DONE]` can fetch its signature at once (nothing to retry), even if the
connection then closes before the engine's final empty message; a client that asks with
`X-Signature-Inband: 1` reads it as an SSE comment just before `[DONE]`, and a client that does
not ask receives the engine's bytes exactly.
"""

from __future__ import annotations

import hashlib
import json

import anyio
import httpx
import openai
import pytest

from support.scripted import REQUEST, _stream_body, scripted_engine
from support.servers import running
from tee_inference.asgi import ASGIApp, Message, Receive, Scope, Send
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.middleware import SigningMiddleware
from tee_inference.services import Services
from tee_inference.signing import ed25519_signature_matches, recover_ecdsa_address

MODEL = "fake-model"
DONE = b"data: [DONE]\n\n"


def _services() -> Services:
    return boot(ServerConfig.build(served_models=(MODEL,)))


def _scope(extra_headers: list[tuple[bytes, bytes]] = ()) -> Scope:  # type: ignore[assignment]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
            "root_path": "", "scheme": "http", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
            "headers": [(b"content-type", b"application/json"), *extra_headers]}  # fmt: skip


def _drive(
    app: ASGIApp, services: Services, *, on_done_leave: bool = False, inband: bool = False
) -> tuple[bytes, list[object]]:
    """Run one request; when the client has `[DONE]`, look the signature up at once (and maybe leave)."""
    received = bytearray()
    seen_at_done: list[object] = []
    left = anyio.Event()

    async def send(message: Message) -> None:
        if message["type"] != "http.response.body":
            return
        if left.is_set():
            raise OSError("client gone")
        received.extend(message.get("body", b""))
        if received.endswith(DONE) and not seen_at_done:
            seen_at_done.append(await services.store.get("chatcmpl-feedbeef"))
            if on_done_leave:
                left.set()

    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": REQUEST, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    headers = [(b"x-signature-inband", b"1")] if inband else []

    async def go() -> None:
        with anyio.fail_after(10):
            await app(_scope(headers), receive, send)

    anyio.run(go)
    return bytes(received), seen_at_done


def _engine_that_stops_at_disconnect(chunks: list[bytes]) -> ASGIApp:
    """Sends every chunk, then waits for the client before its final empty message (as vLLM may)."""
    inner = scripted_engine([])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/v1/chat/completions":
            await inner(scope, receive, send)
            return
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if (await receive())["type"] == "http.disconnect":
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


@pytest.mark.parametrize("split", ["events", "bytes", "done-split"])
def test_signature_is_stored_before_done_reaches_the_client(split: str) -> None:
    body = _stream_body()
    if split == "events":
        chunks = [e + b"\n\n" for e in body.split(b"\n\n") if e]
    elif split == "bytes":
        chunks = [body[i : i + 1] for i in range(len(body))]
    else:
        chunks = [body[:-9], body[-9:-3], body[-3:]]  # `[DONE]` cut in three
    services = _services()
    received, seen = _drive(SigningMiddleware(scripted_engine(chunks), services=services), services)
    assert received == body
    record = seen[0]
    assert record is not None, "the client had [DONE] before the signature was stored"
    assert record.text == f"{hashlib.sha256(REQUEST).hexdigest()}:{hashlib.sha256(body).hexdigest()}"  # type: ignore[attr-defined]


def test_a_stream_closed_right_after_done_is_signed() -> None:
    body = _stream_body()
    services = _services()
    app = SigningMiddleware(_engine_that_stops_at_disconnect([body]), services=services)
    received, _ = _drive(app, services, on_done_leave=True)
    assert received == body
    record = anyio.run(services.store.get, "chatcmpl-feedbeef")
    assert record is not None and record.text.endswith(hashlib.sha256(body).hexdigest())
    assert services.metrics.unsigned.labels("client_disconnected")._value.get() == 0


def _split_inband(received: bytes) -> tuple[bytes, dict[str, str]]:
    """The engine's bytes and the in-band signature document: the comment line sits before [DONE]."""
    before, sep, after = received.partition(b"\n: signature ")
    assert sep, received[-300:]
    line, _, rest = after.partition(b"\n\n")
    assert rest == DONE
    return before + b"\n" + rest, json.loads(line)


@pytest.mark.parametrize("chunking", ["whole", "bytes"])
def test_inband_signature_comes_just_before_done_and_covers_the_engine_bytes(chunking: str) -> None:
    body = _stream_body()
    chunks = [body] if chunking == "whole" else [body[i : i + 1] for i in range(len(body))]
    services = _services()
    received, _ = _drive(SigningMiddleware(scripted_engine(chunks), services=services), services, inband=True)
    engine_bytes, document = _split_inband(received)
    assert engine_bytes == body
    text = f"{hashlib.sha256(REQUEST).hexdigest()}:{hashlib.sha256(body).hexdigest()}"
    assert document["text"] == text and document["id"] == "chatcmpl-feedbeef"
    assert recover_ecdsa_address(text, bytes.fromhex(document["signature"])) == document["signing_address"]
    assert ed25519_signature_matches(text, bytes.fromhex(document["signature_ed25519"]),
                                     bytes.fromhex(document["signing_public_key_ed25519"]))  # fmt: skip
    assert document["signing_address"] == services.signer.ecdsa.address


def test_without_asking_the_client_gets_exactly_the_engine_bytes() -> None:
    body = _stream_body()
    services = _services()
    received, _ = _drive(SigningMiddleware(scripted_engine([body]), services=services), services)
    assert received == body and b": signature" not in received


def test_bytes_after_done_are_not_released_unsigned() -> None:
    """An engine that writes after `[DONE]`: the signature covers what the client gets, nothing more."""
    body = _stream_body()
    services = _services()
    received, _ = _drive(
        SigningMiddleware(scripted_engine([body, b'data: {"late": 1}\n\n']), services=services), services
    )
    assert received == body
    record = anyio.run(services.store.get, "chatcmpl-feedbeef")
    assert record is not None and record.text.endswith(hashlib.sha256(received).hexdigest())


def test_openai_sdk_reads_an_inband_stream_unchanged() -> None:
    services = _services()
    with running(SigningMiddleware(FakeEngine(MODEL), services=services)) as url:
        client = openai.OpenAI(
            base_url=url + "/v1", api_key="unused", default_headers={"x-signature-inband": "1"}
        )
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                     stream=True))  # fmt: skip
        plain = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        same = list(
            plain.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
        assert [c.choices[0].delta.content for c in chunks if c.choices] == [
            c.choices[0].delta.content for c in same if c.choices
        ]
        # And over the wire the comment is there, verifiable, before [DONE].
        raw = json.dumps(
            {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        with (
            httpx.Client(base_url=url) as http,
            http.stream(
                "POST",
                "/v1/chat/completions",
                content=raw,
                headers={"content-type": "application/json", "x-signature-inband": "1"},
            ) as r,
        ):
            received = b"".join(r.iter_raw())
        engine_bytes, document = _split_inband(received)
        assert (
            document["text"]
            == f"{hashlib.sha256(raw).hexdigest()}:{hashlib.sha256(engine_bytes).hexdigest()}"
        )
        stored = httpx.get(f"{url}/v1/signature/{document['id']}").json()
        assert stored["text"] == document["text"] and stored["signature"] == document["signature"]
