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
    with pytest.raises(E2eeError, match="64 lowercase hex"):
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
