"""Response signatures (SPEC §2): EIP-191 ecdsa recovery and ed25519 over ``sha256:sha256`` text."""

from __future__ import annotations

import hmac
import re
from typing import Final

from tee_inference.exceptions import VerificationError
from tee_inference.signing import ed25519_signature_matches, recover_ecdsa_address
from tee_inference.verify.results import CheckResult

SIGNATURE: Final = "signature"
_TEXT = re.compile(r"[0-9a-f]{64}:[0-9a-f]{64}")


def _hex(value: str, name: str) -> bytes:
    text = value.strip()
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise VerificationError(f"{name} is not hex: {value[:40]!r}") from None


def verify_signature(
    text: str, signature: str, *, address: str | None = None, public_key: str | None = None
) -> CheckResult:
    """Check one signature against exactly one identity: an ecdsa address or an ed25519 public key."""
    if (address is None) == (public_key is None):
        raise VerificationError("give exactly one of an ecdsa address or an ed25519 public key")
    sig = _hex(signature, "signature")
    shape = "" if _TEXT.fullmatch(text) else " (note: text is not the sha256:sha256 form of SPEC §2)"
    if address is not None:
        if len(sig) != 65:
            return CheckResult.failed(SIGNATURE, f"an ecdsa signature is 65 bytes r‖s‖v, got {len(sig)}")
        try:
            recovered = recover_ecdsa_address(text, sig)
        except ValueError as exc:
            return CheckResult.failed(SIGNATURE, f"no signer can be recovered: {exc}")
        if not hmac.compare_digest(recovered.lower(), address.strip().lower()):
            return CheckResult.failed(
                SIGNATURE, f"signed by {recovered}, not by {address}: wrong key, or text or signature altered"
            )
        return CheckResult.passed(SIGNATURE, f"ecdsa (EIP-191) signature by {recovered}{shape}")
    key = _hex(public_key or "", "public key")
    if len(key) != 32 or len(sig) != 64:
        return CheckResult.failed(
            SIGNATURE, f"ed25519 needs a 32-byte key and a 64-byte signature, got {len(key)} and {len(sig)}"
        )
    if not ed25519_signature_matches(text, sig, key):
        return CheckResult.failed(
            SIGNATURE,
            f"ed25519 signature does not verify under {key.hex()}: wrong key, or text or signature altered",
        )
    return CheckResult.passed(SIGNATURE, f"ed25519 signature by {key.hex()}{shape}")
