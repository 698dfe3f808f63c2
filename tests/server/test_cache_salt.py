"""Per-tenant prefix-cache partitions: the engine gets a salt; the signature covers the client's bytes."""

from __future__ import annotations

import hashlib
import json

import anyio
import httpx
import pytest

from tee_inference.asgi import ASGIApp, Message, Receive, Scope, Send
from tee_inference.boot import boot, resume
from tee_inference.cachesalt import tenant_salt, with_member
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.middleware import SigningMiddleware

MODEL = "fake-model"
CONFIG = ServerConfig.build(served_models=(MODEL,))
# Not compact, with a trailing newline: the bytes the client sent are what is hashed.
RAW = b'{ "model": "fake-model",\n  "messages": [{"role": "user", "content": "secret prefix"}] }\n'


class Recording:
    """The engine, recording the exact body it received."""

    def __init__(self) -> None:
        self.engine = FakeEngine(MODEL)
        self.bodies: list[bytes] = []
        self.lengths: list[bytes | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.engine(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        self.bodies.append(body)
        self.lengths.append(next((v for k, v in scope["headers"] if k == b"content-length"), None))
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.engine(scope, replay, send)


def _post(app: ASGIApp, raw: bytes, headers: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post(
                "/v1/chat/completions", content=raw, headers={"content-type": "application/json", **headers}
            )

    return anyio.run(go)


def test_the_engine_gets_the_tenants_salt_and_the_signature_covers_the_client_bytes() -> None:
    services = boot(CONFIG)
    engine = Recording()
    app = SigningMiddleware(engine, services=services)
    response = _post(app, RAW, {"x-tee-tenant": "alice"})
    assert response.status_code == 200
    salt = tenant_salt(services.keys.cache_salt_key, "alice")
    assert len(salt) == 43  # 256 bits, base64url, as vLLM advises
    # Exactly one member added before the last brace; every other byte as the client sent it.
    assert engine.bodies[0] == RAW[:-2] + f',"cache_salt":"{salt}"'.encode() + RAW[-2:]
    assert engine.lengths[0] == str(len(engine.bodies[0])).encode()
    assert json.loads(engine.bodies[0])["cache_salt"] == salt
    text = response.headers["x-signature-text"]
    assert text.split(":")[0] == hashlib.sha256(RAW).hexdigest()


def test_partitions_differ_per_tenant_and_agree_across_processes_of_one_boot() -> None:
    booted = boot(CONFIG)
    assert booted.boot_state is not None
    other_process = resume(CONFIG, booted.boot_state)
    assert other_process.keys.cache_salt_key == booted.keys.cache_salt_key
    assert tenant_salt(booted.keys.cache_salt_key, "alice") != tenant_salt(booted.keys.cache_salt_key, "bob")
    # Another boot (another node) salts differently: a tenant's name is not its salt.
    assert tenant_salt(boot(CONFIG).keys.cache_salt_key, "alice") != tenant_salt(
        booted.keys.cache_salt_key, "alice"
    )


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, RAW),  # no tenant named: the shared cache, as before
        ({"x-tee-tenant": "has space"}, RAW),  # not a tenant label
        (
            {"x-tee-tenant": "alice"},
            RAW.replace(b'"model"', b'"cache_salt": "mine", "model"'),
        ),  # caller's own
    ],
)
def test_bodies_that_are_not_salted_reach_the_engine_untouched(headers: dict[str, str], body: bytes) -> None:
    engine = Recording()
    response = _post(SigningMiddleware(engine, services=boot(CONFIG)), body, headers)
    assert response.status_code == 200
    assert engine.bodies == [body]


def test_isolation_can_be_turned_off() -> None:
    engine = Recording()
    services = boot(ServerConfig.build(served_models=(MODEL,), cache_isolation=False))
    _post(SigningMiddleware(engine, services=services), RAW, {"x-tee-tenant": "alice"})
    assert engine.bodies == [RAW]


def test_with_member_is_byte_exact() -> None:
    assert with_member(b'{"a":1}', "k", "v") == b'{"a":1,"k":"v"}'
    assert with_member(b'{"a":1} \r\n', "k", "v") == b'{"a":1,"k":"v"} \r\n'
    assert with_member(b"{ }", "k", "v") == b'{ "k":"v"}'
    assert with_member(b"[1]", "k", "v") is None
    assert with_member('{"a":1}'.encode("utf-16-be"), "k", "v") is None
    assert with_member(b"", "k", "v") is None
