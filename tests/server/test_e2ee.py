"""EHBP-compatible encrypted bodies: our primitives against themselves and against Tinfoil's client."""

from __future__ import annotations

import os

import ehbp
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tee_inference.e2ee import (
    ClientExchange,
    E2eeError,
    FrameReader,
    ReplayGuard,
    ServerExchange,
    frame,
    key_config,
    parse_key_config,
    public_bytes,
)


@pytest.fixture
def key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def test_round_trip_request_and_streamed_response(key: X25519PrivateKey) -> None:
    client = ClientExchange(public_bytes(key.public_key()))
    body = b'{"model": "m", "messages": []}'
    server = ServerExchange(key, client.enc_header)
    assert server.open_body(client.seal_body(body)) == body
    events = [b'data: {"id":"chatcmpl-1"}\n\n', b"", b"data: [DONE]\n\n"]
    wire = b"".join(server.seal(e) for e in events)
    client.start_response(server.response_nonce.hex())
    # Any cut of the wire gives the same plaintext, frame by frame.
    out = b"".join(client.open(wire[i : i + 7]) for i in range(0, len(wire), 7))
    client.finish()
    assert out == b"".join(events)


def test_tamper_reorder_truncate_and_wrong_key_fail(key: X25519PrivateKey) -> None:
    client = ClientExchange(public_bytes(key.public_key()))
    sealed = bytearray(client.seal_body(b"secret prompt"))
    sealed[-1] ^= 1
    with pytest.raises(E2eeError, match="does not authenticate"):
        ServerExchange(key, client.enc_header).open_body(bytes(sealed))
    with pytest.raises(E2eeError, match="does not authenticate"):
        ServerExchange(X25519PrivateKey.generate(), client.enc_header).open_body(client.seal_body(b"x"))
    with pytest.raises(E2eeError, match="ends inside a frame"):
        ServerExchange(key, client.enc_header).open_body(client.seal_body(b"secret")[:-3])
    with pytest.raises(E2eeError, match="64 hex characters"):
        ServerExchange(key, b"zz")
    server = ServerExchange(key, client.enc_header)
    first, second = server.seal(b"one"), server.seal(b"two")
    client.start_response(server.response_nonce.hex())
    with pytest.raises(E2eeError, match="does not authenticate"):
        client.open(second + first)  # swapped chunks: the counter in the nonce catches it
    with pytest.raises(E2eeError, match="no valid Ehbp-Response-Nonce"):
        ClientExchange(public_bytes(key.public_key())).start_response(None)


def test_frame_reader_bounds_and_empty_frames() -> None:
    reader = FrameReader()
    assert reader.feed(frame(b"") + frame(b"ab") + frame(b"c")[:2]) == [b"ab"]
    with pytest.raises(E2eeError, match="ends inside a frame"):
        reader.finish()
    with pytest.raises(E2eeError, match="larger than any body"):
        FrameReader().feed((1 << 30).to_bytes(4, "big"))


def test_replay_guard_is_bounded() -> None:
    guard = ReplayGuard(ttl_s=10, max_entries=2)
    assert guard.first_use(b"a", now=0) and not guard.first_use(b"a", now=1)
    assert guard.first_use(b"b", now=2) and guard.first_use(b"c", now=3)  # "a" is forgotten: bounded
    assert guard.first_use(b"a", now=4)
    assert guard.first_use(b"c", now=20)  # past the window


def test_interoperates_with_tinfoils_reference_client(key: X25519PrivateKey) -> None:
    """Tinfoil's own EHBP code seals a request we open, and opens a response we seal."""
    config = key_config(public_bytes(key.public_key()))
    assert parse_key_config(config) == public_bytes(key.public_key())
    identity = ehbp.ServerIdentity.unmarshal_public_config(config)
    request = identity.encrypt_request_body(b"hello from tinfoil")
    assert request is not None
    server = ServerExchange(key, request.encapsulated_key.hex().encode())
    assert server.open_body(request.body) == b"hello from tinfoil"
    keys = ehbp.derive_response_keys(
        request.token.exported_secret, request.encapsulated_key, server.response_nonce
    )
    decryptor = ehbp.FrameDecryptor(keys)
    chunks = [b"data: 1\n\n", b"data: [DONE]\n\n"]
    wire = b"".join(server.seal(c) for c in chunks)
    assert b"".join(decryptor.push(wire)) == b"".join(chunks)
    decryptor.finish()
    # And the other way: our client's request opens under the reference's expectations of framing.
    ours = ClientExchange(identity.public_key_bytes())
    assert ServerExchange(key, ours.enc_header).open_body(ours.seal_body(os.urandom(100_000))) is not None


# -- through the server ------------------------------------------------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import httpx  # noqa: E402
import openai  # noqa: E402

from support.relay import tcp_relay  # noqa: E402
from support.servers import running  # noqa: E402
from support.simulated_report import simulated_server_expectations  # noqa: E402
from tee_inference.boot import boot  # noqa: E402
from tee_inference.client import AttestedClient  # noqa: E402
from tee_inference.config import ServerConfig  # noqa: E402
from tee_inference.e2ee import parse_key_config as _parse  # noqa: E402
from tee_inference.engines.fake import FakeEngine  # noqa: E402
from tee_inference.middleware import SigningMiddleware  # noqa: E402
from tee_inference.services import Services  # noqa: E402
from tee_inference.signing import recover_ecdsa_address  # noqa: E402

MODEL = "fake-model"
MARKER = "violet-heron-4417"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": f"repeat {MARKER}"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Services]]:
    services = boot(ServerConfig.build(served_models=(MODEL,), model_weights_root=FakeEngine.weights_root()))
    with running(SigningMiddleware(FakeEngine(MODEL), services=services)) as url:
        yield url, services


def _sealed(services: Services, body: dict) -> tuple[ClientExchange, bytes]:
    exchange = ClientExchange(public_bytes(services.keys.e2ee.public_key()))
    return exchange, exchange.seal_body(json.dumps(body).encode())


def test_tinfoils_transport_talks_to_our_server(served: tuple[str, Services]) -> None:
    url, services = served
    key = httpx.get(f"{url}/.well-known/hpke-keys").content
    assert _parse(key) == public_bytes(services.keys.e2ee.public_key())
    transport = ehbp.EHBPTransport(ehbp.ServerIdentity.unmarshal_public_config(key))
    with httpx.Client(transport=transport, base_url=url) as client:
        answer = client.post("/v1/chat/completions", json=CHAT, headers={"accept-encoding": "identity"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]


def test_signature_covers_the_ciphertext_both_ways(served: tuple[str, Services]) -> None:
    url, services = served
    exchange, body = _sealed(services, CHAT)
    headers = {"content-type": "application/json", "ehbp-encapsulated-key": exchange.enc_header.decode()}
    reply = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)
    assert reply.status_code == 200 and MARKER.encode() not in reply.content
    text = f"{hashlib.sha256(body).hexdigest()}:{hashlib.sha256(reply.content).hexdigest()}"
    assert reply.headers["x-signature-text"] == text
    assert (
        recover_ecdsa_address(text, bytes.fromhex(reply.headers["x-signature"]))
        == services.signer.ecdsa.address
    )
    exchange.start_response(reply.headers["ehbp-response-nonce"])
    plain = exchange.open(reply.content)
    exchange.finish()
    assert json.loads(plain)["object"] == "chat.completion"


def test_bad_keys_tampering_replays_and_lies_get_clear_4xx(served: tuple[str, Services]) -> None:
    url, services = served
    exchange, body = _sealed(services, CHAT)
    headers = {"content-type": "application/json", "ehbp-encapsulated-key": exchange.enc_header.decode()}
    tampered = bytearray(body)
    tampered[-2] ^= 1
    answer = httpx.post(f"{url}/v1/chat/completions", content=bytes(tampered), headers=headers)
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "e2ee_key_mismatch"
    garbage = httpx.post(
        f"{url}/v1/chat/completions", content=body, headers={**headers, "ehbp-encapsulated-key": "zz"}
    )
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "e2ee_malformed"
    truncated = httpx.post(f"{url}/v1/chat/completions", content=body[:-5], headers=headers)
    assert truncated.status_code == 400 and "ends inside a frame" in truncated.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers).status_code == 200
    replayed = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)
    assert replayed.status_code == 409 and replayed.json()["error"]["code"] == "e2ee_replay"
    # Errors about a request that decrypted are encrypted for its sender only.
    other, sealed = _sealed(services, {**CHAT, "model": "other-model"})
    refused = httpx.post(
        f"{url}/v1/chat/completions", content=sealed,
        headers={"content-type": "application/json", "ehbp-encapsulated-key": other.enc_header.decode()},
    )  # fmt: skip
    assert refused.status_code == 400 and "ehbp-response-nonce" in refused.headers
    other.start_response(refused.headers["ehbp-response-nonce"])
    assert json.loads(other.open(refused.content))["error"]["code"] == "model_not_confidential"
    liar, sealed = _sealed(services, CHAT)
    lied = httpx.post(
        f"{url}/v1/chat/completions", content=sealed,
        headers={"content-type": "application/json", "ehbp-encapsulated-key": liar.enc_header.decode(),
                 "x-tee-model": "cheap-model"},
    )  # fmt: skip
    liar.start_response(lied.headers["ehbp-response-nonce"])
    assert json.loads(liar.open(lied.content))["error"]["code"] == "model_header_mismatch"


def test_the_verifying_client_encrypts_streams_and_checks_them(
    served: tuple[str, Services], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    url, _ = served
    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps(simulated_server_expectations({MODEL: FakeEngine.weights_root()})))
    seen: list[bytes] = []  # every byte a host between client and server could read
    with tcp_relay(int(url.rsplit(":", 1)[1]), seen) as port:
        relayed = f"http://127.0.0.1:{port}"
        http = AttestedClient(relayed, model=MODEL, expect=expected, allow_simulated=True, allow_plaintext=True,
                              encrypt=True)  # fmt: skip
        llm = openai.OpenAI(base_url=f"{relayed}/v1", api_key="-", http_client=http, max_retries=0)
        whole = llm.chat.completions.create(**CHAT)
        assert whole.choices[0].message.content
        chunks = list(llm.chat.completions.create(**CHAT, stream=True))
        assert len(chunks) > 1
        http.close()
    wire = b"".join(seen)
    assert b"ehbp-encapsulated-key" in wire.lower() and b"x-tee-model: fake-model" in wire.lower()
    # The prompt never crossed in clear, nor did the answer (it came back decrypted above).
    assert MARKER.encode() not in wire
    assert whole.choices[0].message.content.encode() not in wire


def test_an_unsigned_success_to_an_encrypted_request_is_encrypted_too() -> None:
    """An engine's non-200 success (not a completion: nothing signed) still never goes back in clear."""
    secret = f"engine note {MARKER}".encode()

    async def engine(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await FakeEngine(MODEL)(scope, receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(secret)).encode())]
        await send({"type": "http.response.start", "status": 202, "headers": headers})
        await send({"type": "http.response.body", "body": secret, "more_body": False})

    services = boot(ServerConfig.build(served_models=(MODEL,), model_weights_root=FakeEngine.weights_root()))
    with running(SigningMiddleware(engine, services=services)) as url:
        exchange, body = _sealed(services, CHAT)
        headers = {"content-type": "application/json", "ehbp-encapsulated-key": exchange.enc_header.decode()}
        reply = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)
    assert reply.status_code == 202 and "x-signature" not in reply.headers
    assert MARKER.encode() not in reply.content
    exchange.start_response(reply.headers["ehbp-response-nonce"])
    assert exchange.open(reply.content) == secret
    exchange.finish()
