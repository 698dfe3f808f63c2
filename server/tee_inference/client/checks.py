"""The checks on one completion's bytes, without I/O: what the sync and async clients share."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx

from tee_inference.e2ee import NONCE_HEADER, ClientExchange
from tee_inference.exceptions import TeeInferenceError
from tee_inference.sse import StreamIdScanner
from tee_inference.verify.results import VerificationResult
from tee_inference.verify.signature import verify_signature

COMPLETION_PATHS: Final = frozenset({"/v1/chat/completions", "/v1/completions"})
INBAND_HEADER: Final = "x-signature-inband"
_INBAND_PREFIX: Final = b": signature "
_DONE: Final = b"data: [DONE]\n\n"


class AttestationError(TeeInferenceError):
    """The server did not verify: ``result`` holds every check."""

    def __init__(self, result: VerificationResult) -> None:
        blocking = ", ".join(f"{c.name}: {c.detail}" for c in result.blocking[:3])
        super().__init__(f"the server did not verify ({blocking})")
        self.result = result


class SignatureMismatchError(TeeInferenceError):
    """A response's signature is missing, or does not cover the bytes this client exchanged."""


@dataclass(frozen=True)
class AttestedNode:
    """One verified node of a report (a gateway's lists several): its key and its body-encryption key."""

    identity: str  # the ecdsa address, or the ed25519 public key (hex)
    address: str | None
    e2ee_public_key: bytes | None


@dataclass(frozen=True)
class Attestation:
    """What one verification established: the keys a response may be checked against."""

    result: VerificationResult
    signing_algo: str
    identity: str  # the ecdsa address, or the ed25519 public key (hex)
    tls_spki_sha256: bytes | None
    e2ee_public_key: bytes | None = None
    nodes: tuple[AttestedNode, ...] = ()  # every verified node, this one first

    def identity_for(self, named: object) -> str:
        """The verified key a response names (a gateway's come from several nodes), else this node's."""
        if isinstance(named, str):
            for node in self.nodes:
                if node.identity.lower() == named.lower():
                    return node.identity
        return self.identity


class ResponseChecker:
    """The signature checks over one completion's bytes, without I/O (sync and async share it).

    ``feed`` every chunk as it arrives and forward what it returns (an in-band signature comment
    is taken out, exactly as the server left it out of the signed hash). When ``done`` is true
    the signature must be checked before the last bytes are handed on: ``needs_fetch`` says
    whether it has to be fetched by ``completion_id``; ``verify`` raises on any mismatch.
    """

    def __init__(
        self,
        request_hash: str,
        response: httpx.Response,
        attestation: Attestation,
        exchange: ClientExchange | None = None,
    ) -> None:
        self.request_hash = request_hash
        self.attestation = attestation
        self.headers = response.headers
        self.exchange = exchange
        # Error answers are never signed; to an encrypted request they are still encrypted.
        self.signed = response.status_code == 200
        if exchange is not None:
            exchange.start_response(response.headers.get(NONCE_HEADER.decode()))
        self.streaming = response.headers.get("content-type", "").startswith("text/event-stream")
        self.hash = hashlib.sha256()
        self.scanner = StreamIdScanner()
        self.whole = bytearray()
        self.partial = b""
        self.tail = b""
        self.inband: dict[str, Any] | None = None
        self.skip_blank = False
        self.done = False

    @property
    def completion_id(self) -> str | None:
        if self.streaming:
            return self.scanner.completion_id
        try:
            value = json.loads(bytes(self.whole)).get("id")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    @property
    def needs_fetch(self) -> bool:
        if not self.signed:
            return False
        if not self.streaming:
            # An answer too big for the server to hold comes without signature headers; its
            # signature is stored under its id before its last bytes are sent.
            return "x-signature-text" not in self.headers
        # Encrypted streams carry no in-band signature: it would have to cover itself.
        return self.inband is None

    def feed(self, chunk: bytes) -> bytes:
        if self.exchange is not None:
            # The wire bytes are signed; the plaintext is what the caller reads and what is scanned.
            self.hash.update(chunk)
            return self._plain(self.exchange.open(chunk))
        if not self.streaming:
            self.hash.update(chunk)
            self.whole += chunk
            return chunk
        out = bytearray()
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()  # an unterminated line waits for its end
        for line in lines:
            raw = line + b"\n"
            if self.skip_blank:
                # The in-band comment is its own SSE block: its closing blank line is not the engine's.
                self.skip_blank = False
                if not line:
                    continue
            if line.startswith(_INBAND_PREFIX) and self.inband is None:
                self.inband = self._parse_inband(line[len(_INBAND_PREFIX) :])
                self.skip_blank = True
                continue
            self.hash.update(raw)
            self.scanner.feed(raw)
            out += raw
            self.tail = (self.tail + raw)[-len(_DONE) :]
            if self.tail == _DONE:
                self.done = True
        return bytes(out)

    def _plain(self, plaintext: bytes) -> bytes:
        if not self.streaming:
            self.whole += plaintext
            return plaintext
        self.scanner.feed(plaintext)
        self.tail = (self.tail + plaintext)[-len(_DONE) :]
        if self.tail == _DONE:
            self.done = True
        return plaintext

    def finish(self) -> bytes:
        """At the end of the body: what is left, and whether the stream ended without [DONE]."""
        if self.exchange is not None:
            self.exchange.finish()
        rest, self.partial = self.partial, b""
        if rest:
            self.hash.update(rest)
        if not self.streaming:
            self.done = True
        elif not self.done:
            raise SignatureMismatchError("the stream ended before data: [DONE]: it was cut short")
        return rest

    @staticmethod
    def _parse_inband(text: bytes) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError:
            raise SignatureMismatchError("the in-band signature is not JSON") from None
        if not isinstance(value, dict):
            raise SignatureMismatchError("the in-band signature is not a JSON object")
        return value

    def verify(self, fetched: Mapping[str, Any] | None = None) -> None:
        """Check the signature (headers, in-band or ``fetched``) over this exchange's bytes."""
        if not self.signed:
            return
        text = f"{self.request_hash}:{self.hash.hexdigest()}"
        algo = self.attestation.signing_algo
        record: Mapping[str, Any] | None = fetched or self.inband
        if record is None:
            record = self._from_headers()
        identity = self.attestation.identity_for(self._named(record, algo))
        if record.get("text") != text:
            raise SignatureMismatchError(
                f"the server signed {record.get('text')!r}, but the bytes exchanged hash to {text!r}"
            )
        signature = self._signature(record, algo)
        check = (
            verify_signature(text, signature, address=identity)
            if algo == "ecdsa"
            else verify_signature(text, signature, public_key=identity)
        )
        if check.status.value != "pass":
            raise SignatureMismatchError(check.detail)

    def _named(self, record: Mapping[str, Any], algo: str) -> object:
        """The key the answer says signed it (checked only against verified nodes' keys)."""
        if algo == "ecdsa":
            return record.get("signing_address") or self.headers.get("x-signing-address")
        return (
            record.get("signing_public_key")
            or record.get("signing_public_key_ed25519")
            or self.headers.get("x-signing-public-key-ed25519")
        )

    def _from_headers(self) -> dict[str, str]:
        h = self.headers
        if "x-signature-text" not in h:
            raise SignatureMismatchError("the answer carries no X-Signature-Text header")
        return {
            "text": h["x-signature-text"],
            "signature": h.get("x-signature", ""),
            "ed25519": h.get("x-signature-ed25519", ""),
        }

    @staticmethod
    def _signature(record: Mapping[str, Any], algo: str) -> str:
        if algo == "ed25519":
            value = (
                record.get("ed25519")
                or record.get("signature_ed25519")
                or (record.get("signature") if record.get("signing_algo") == "ed25519" else None)
            )
        else:
            value = record.get("signature") if record.get("signing_algo", "ecdsa") == "ecdsa" else None
            value = value or record.get("ecdsa")
        if not isinstance(value, str) or not value:
            raise SignatureMismatchError(f"no {algo} signature for this completion")
        return value
