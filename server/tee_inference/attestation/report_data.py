"""Packing and explaining the 64-byte TDX ``report_data`` that binds a signing key to a nonce.

Layouts (SPEC §3)::

    ecdsa      | signing address (20) | 00 × 12 | nonce (32) |
    ed25519    | public key (32)                | nonce (32) |
    with TLS   | sha256(identity ‖ SPKI sha256) | nonce (32) |   include_tls_fingerprint=true

The TLS layout is nearai's, byte for byte, so their public verifier checks our reports:
``identity`` is the 20 raw address bytes (ecdsa) or the 32 raw public-key bytes (ed25519), and
the SPKI hash is the 32 raw bytes of sha256 over the certificate's DER SubjectPublicKeyInfo.
"""

from __future__ import annotations

import hashlib
from typing import Final

from tee_inference.exceptions import FormatError
from tee_inference.signing import SigningAlgo

REPORT_DATA_SIZE: Final = 64
NONCE_SIZE: Final = 32
ADDRESS_SIZE: Final = 20
ED25519_PUBLIC_KEY_SIZE: Final = 32

# (name, start, end) with end exclusive; names are what a person reads in an error.
_ECDSA_REGIONS: Final[tuple[tuple[str, int, int], ...]] = (
    ("signing address (bytes 0–19)", 0, 20),
    ("zero padding (20–31)", 20, 32),
    ("nonce (32–63)", 32, 64),
)
_ED25519_REGIONS: Final[tuple[tuple[str, int, int], ...]] = (
    ("public key (0–31)", 0, 32),
    ("nonce (32–63)", 32, 64),
)
_TLS_REGIONS: Final[tuple[tuple[str, int, int], ...]] = (
    ("sha256(key ‖ TLS SPKI) (0–31)", 0, 32),
    ("nonce (32–63)", 32, 64),
)


class ReportDataError(FormatError):
    """A report_data input has the wrong length or an unknown signing algorithm was named."""


def _require_length(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ReportDataError(f"{name} must be {size} bytes, got {len(value)}")


def report_data_for_ecdsa(address: bytes, nonce: bytes) -> bytes:
    """Return ``address ‖ 12 zero bytes ‖ nonce`` for a secp256k1 signing address (20 raw bytes)."""
    _require_length("signing address", address, ADDRESS_SIZE)
    _require_length("nonce", nonce, NONCE_SIZE)
    return address + bytes(NONCE_SIZE - ADDRESS_SIZE) + nonce


def report_data_for_ed25519(public_key: bytes, nonce: bytes) -> bytes:
    """Return ``public_key ‖ nonce`` for a raw 32-byte Ed25519 public key."""
    _require_length("ed25519 public key", public_key, ED25519_PUBLIC_KEY_SIZE)
    _require_length("nonce", nonce, NONCE_SIZE)
    return public_key + nonce


def report_data_for_tls(identity: bytes, spki_sha256: bytes, nonce: bytes) -> bytes:
    """Return ``sha256(identity ‖ spki_sha256) ‖ nonce`` (nearai's include_tls_fingerprint layout)."""
    if len(identity) not in (ADDRESS_SIZE, ED25519_PUBLIC_KEY_SIZE):
        raise ReportDataError(f"identity must be a 20-byte address or a 32-byte key, got {len(identity)}")
    _require_length("TLS SPKI sha256", spki_sha256, 32)
    _require_length("nonce", nonce, NONCE_SIZE)
    return hashlib.sha256(identity + spki_sha256).digest() + nonce


def report_data_for(algo: SigningAlgo | str, key: bytes, nonce: bytes) -> bytes:
    """Dispatch on ``algo`` (``"ecdsa"`` with an address, ``"ed25519"`` with a public key)."""
    if algo == "ecdsa":
        return report_data_for_ecdsa(key, nonce)
    if algo == "ed25519":
        return report_data_for_ed25519(key, nonce)
    raise ReportDataError(f"unknown signing algorithm {algo!r}; expected 'ecdsa' or 'ed25519'")


def explain_report_data_mismatch(expected: bytes, actual: bytes, algo: str) -> str | None:
    """Say which regions of ``actual`` differ from ``expected``, or return None when they are equal.

    Each differing region is named with its byte range, the first differing offset and both
    values in hex, so an auditor can tell a wrong key from a replayed nonce at a glance.
    """
    _require_length("expected report_data", expected, REPORT_DATA_SIZE)
    _require_length("actual report_data", actual, REPORT_DATA_SIZE)
    if algo == "ecdsa":
        regions = _ECDSA_REGIONS
    elif algo == "ed25519":
        regions = _ED25519_REGIONS
    elif algo == "tls":
        regions = _TLS_REGIONS
    else:
        raise ReportDataError(f"unknown signing algorithm {algo!r}; expected 'ecdsa' or 'ed25519'")
    if expected == actual:
        return None
    parts = []
    for name, start, end in regions:
        want, got = expected[start:end], actual[start:end]
        if want == got:
            continue
        first = start + next(i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b)
        parts.append(f"{name} differs from byte {first}: expected {want.hex()}, quote has {got.hex()}")
    return "report_data mismatch: " + "; ".join(parts)
