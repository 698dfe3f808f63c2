"""Signed usage: the node's own token counts for one completion, signed with the attested key.

A billing gateway that charges for tokens needs a statement it can show a customer, and a
customer needs one it can check: an HMAC shared between gateway and node proves nothing to a
third party. So the node signs, per completion id, what it counted, with the same boot key the
quote binds (EIP-191 ecdsa and ed25519, as completions are signed)::

    text = "<completion id>:<prompt_tokens>:<completion_tokens>:<source>"
    e.g.   "chatcmpl-8d2f…:42:17:engine"

``source`` says where the numbers come from (docs/scale-out.md, "Usage"):

- ``engine``: vLLM's own count, exact (the ``usage`` of a whole answer or of a stream's usage event,
  or the per-request usage vLLM keeps for middleware when a stream did not ask for it);
- ``counted``: the node's own count, when the engine gave none (a stream cut short by the client or
  the engine): the generated events it forwarded, and the prompt as the engine's tokenizer counts it.

The text has four ``:``-separated fields, so it can never be mistaken for a completion's
``sha256:sha256`` text signed by the same key. Only primitives live here (no server dependency):
the verifier and a billing gateway import them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from tee_inference.signing import (
    CompletionSigner,
    checksum_address,
    ecdsa_signature_matches,
    ed25519_signature_matches,
)

UsageSource = Literal["engine", "counted"]
USAGE_SOURCES: Final[tuple[UsageSource, ...]] = ("engine", "counted")
# The completion-id alphabet of store.COMPLETION_ID: no ':' inside an id, so the text splits one way.
_TEXT: Final = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,255}):(\d{1,12}):(\d{1,12}):(engine|counted)")


@dataclass(frozen=True, slots=True)
class Usage:
    """What one completion consumed, as the node counted it."""

    completion_id: str
    prompt_tokens: int
    completion_tokens: int
    source: UsageSource

    @property
    def text(self) -> str:
        return f"{self.completion_id}:{self.prompt_tokens}:{self.completion_tokens}:{self.source}"

    @classmethod
    def from_text(cls, text: str) -> Usage | None:
        """The usage a signed text states, or None when it is not one."""
        match = _TEXT.fullmatch(text)
        if match is None:
            return None
        source: UsageSource = "engine" if match.group(4) == "engine" else "counted"
        return cls(match.group(1), int(match.group(2)), int(match.group(3)), source)


@dataclass(frozen=True, slots=True)
class SignedUsage:
    """A usage statement with both signatures and the identity that made them."""

    usage: Usage
    ecdsa: bytes
    ed25519: bytes
    signing_address: str
    ed25519_public_key: bytes

    @property
    def text(self) -> str:
        return self.usage.text

    def fields(self, algo: str) -> dict[str, Any]:
        """What `GET /v1/signature/{id}` adds for this usage, for the algorithm asked."""
        out: dict[str, Any] = {
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "total_tokens": self.usage.prompt_tokens + self.usage.completion_tokens,
                "source": self.usage.source,
            },
            "usage_text": self.text,
        }
        if algo == "ed25519":
            out["usage_signature"] = self.ed25519.hex()
            out["signing_public_key"] = self.ed25519_public_key.hex()
        else:
            out["usage_signature"] = self.ecdsa.hex()
            out["signing_address"] = self.signing_address
        return out

    def to_record(self) -> dict[str, Any]:
        """The stored form (both algorithms), as a shared store keeps it."""
        return {
            "text": self.text,
            "ecdsa": self.ecdsa.hex(),
            "ed25519": self.ed25519.hex(),
            "signing_address": self.signing_address,
            "ed25519_public_key": self.ed25519_public_key.hex(),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SignedUsage | None:
        """The stored form read back; None when it is malformed (never half a record)."""
        usage = Usage.from_text(str(record.get("text", "")))
        if usage is None:
            return None
        try:
            return cls(
                usage=usage,
                ecdsa=bytes.fromhex(str(record["ecdsa"])),
                ed25519=bytes.fromhex(str(record["ed25519"])),
                signing_address=checksum_address(bytes.fromhex(str(record["signing_address"])[2:])),
                ed25519_public_key=bytes.fromhex(str(record["ed25519_public_key"])),
            )
        except (KeyError, ValueError, TypeError):
            return None

    def verifies(self, address: str, ed25519_public_key: bytes) -> bool:
        """Both signatures are over this text and by this identity (both keys of one node)."""
        return (
            self.signing_address.lower() == address.lower()
            and self.ed25519_public_key == ed25519_public_key
            and ecdsa_signature_matches(self.text, self.ecdsa, address)
            and ed25519_signature_matches(self.text, self.ed25519, ed25519_public_key)
        )


def sign_usage(signer: CompletionSigner, usage: Usage) -> SignedUsage:
    text = usage.text
    return SignedUsage(
        usage=usage,
        ecdsa=signer.ecdsa.sign(text),
        ed25519=signer.ed25519.sign(text),
        signing_address=signer.ecdsa.address,
        ed25519_public_key=signer.ed25519.public_key,
    )
