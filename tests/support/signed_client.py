"""A client that checks a signed completion from raw bytes, as an auditor would."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct

from tee_inference.signing import ed25519_signature_matches


@dataclass(frozen=True)
class SignedCompletion:
    completion_id: str
    raw_request: bytes
    raw_response: bytes
    headers: httpx.Headers
    text: str
    signing_address: str
    ed25519_public_key: str


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def first_id(body: bytes, stream: bool) -> str:
    if not stream:
        return str(json.loads(body)["id"])
    line = next(line for line in body.split(b"\n") if line.startswith(b"data: {"))
    return str(json.loads(line[6:])["id"])


def signed_completion(
    client: httpx.Client,
    path: str,
    body: dict[str, Any],
    model: str,
    headers: dict[str, str] | None = None,
) -> SignedCompletion:
    """POST raw bytes, then prove both stored signatures cover sha256(req):sha256(resp)."""
    # Not compact and with a trailing newline: the server must hash the bytes as sent.
    raw = (json.dumps({"model": model, **body}, indent=1, ensure_ascii=False) + "\n").encode()
    stream = bool(body.get("stream"))
    sent = {"content-type": "application/json", **(headers or {})}
    with client.stream("POST", path, content=raw, headers=sent) as r:
        received = b"".join(r.iter_raw())
        assert r.status_code == 200, received[:500]
        headers = r.headers
    if stream:
        assert received.endswith(b"data: [DONE]\n\n")
    completion_id = first_id(received, stream)
    text = f"{_sha(raw)}:{_sha(received)}"
    ecdsa = client.get(f"/v1/signature/{completion_id}", params={"model": model}).json()
    assert ecdsa["text"] == text
    assert ecdsa["signing_algo"] == "ecdsa"
    signer = Account.recover_message(encode_defunct(text=text), signature=bytes.fromhex(ecdsa["signature"]))
    assert signer == ecdsa["signing_address"]
    ed = client.get(
        f"/v1/signature/{completion_id}", params={"model": model, "signing_algo": "ed25519"}
    ).json()
    assert ed["text"] == text
    assert ed25519_signature_matches(
        text, bytes.fromhex(ed["signature"]), bytes.fromhex(ed["signing_public_key"])
    )
    if not stream:
        assert headers["x-signature-text"] == text
        assert headers["x-signing-address"] == signer
        assert headers["x-signature"] == ecdsa["signature"]
        assert headers["content-length"] == str(len(received))
    return SignedCompletion(completion_id, raw, received, headers, text, signer, ed["signing_public_key"])
