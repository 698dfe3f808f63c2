"""The ``nvidia_payload`` of a report (SPEC §3): NVIDIA's NRAS v3 request body, one entry per GPU.

    {"nonce": hex, "arch": "HOPPER",
     "evidence_list": [{"evidence": base64, "certificate": base64(PEM chain), "arch": "HOPPER"}, …]}

NVSwitch evidence (an HGX board in PPCIe mode: 8 GPUs, 4 NVSwitches) travels in the same list,
each switch entry marked ``"arch": "LS10"``, while the payload's own ``arch`` stays the GPUs'.
An entry without ``arch`` takes the payload's. NRAS attests switches at another endpoint, so a
client posting this to NRAS's GPU endpoint leaves the switch entries out.

The binary report each ``evidence`` holds is read by :mod:`nvidia_spdm`, its certificate chain by
:mod:`nvidia_certs`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Final

from cryptography import x509

from tee_inference.attestation.nvidia_certs import decode_certificate_chain
from tee_inference.attestation.nvidia_spdm import (
    GET_MEASUREMENTS,
    NONCE_SIZE,
    GpuAttestationError,
    GpuEvidence,
    parse_gpu_evidence,
)

DEFAULT_ARCH: Final = "HOPPER"


class NvidiaPayloadError(GpuAttestationError, ValueError):
    """An ``nvidia_payload`` JSON string does not have the NRAS v3 shape."""


def decode_evidence(b64_text: str) -> bytes:
    """Raw SPDM evidence from an ``evidence`` field: base64 of raw bytes, or of their hex text.

    The two forms cannot be confused: raw evidence starts with an SPDM version byte
    (0x10-0x1F) and GET_MEASUREMENTS (0xE0), bytes no ASCII hex digit can be.
    """
    try:
        # Some producers wrap base64 at 76 columns; the whitespace carries nothing.
        data = base64.b64decode("".join(b64_text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NvidiaPayloadError(f"evidence is not base64: {exc}") from None
    if len(data) >= 2 and 0x10 <= data[0] <= 0x1F and data[1] == GET_MEASUREMENTS:
        return data
    text = data.strip()
    if text and len(text) % 2 == 0 and all(c in b"0123456789abcdefABCDEF" for c in text):
        raw = bytes.fromhex(text.decode("ascii"))
        if len(raw) >= 2 and 0x10 <= raw[0] <= 0x1F and raw[1] == GET_MEASUREMENTS:
            return raw
    raise NvidiaPayloadError(
        "evidence is neither base64 of an SPDM GET_MEASUREMENTS report nor base64 of its hex text"
    )


@dataclass(frozen=True)
class GpuEvidenceEntry:
    """One GPU's evidence (raw SPDM bytes) and its certificate chain (PEM, leaf first)."""

    evidence: bytes
    certificate_chain_pem: bytes
    arch: str = DEFAULT_ARCH

    def parse(self) -> GpuEvidence:
        return parse_gpu_evidence(self.evidence)

    def certificates(self) -> list[x509.Certificate]:
        return decode_certificate_chain(self.certificate_chain_pem)


@dataclass(frozen=True)
class NvidiaPayload:
    """The NRAS v3 request body that SPEC §3 carries as the ``nvidia_payload`` string."""

    nonce: bytes
    entries: tuple[GpuEvidenceEntry, ...]
    arch: str = DEFAULT_ARCH

    def to_json(self) -> str:
        """Always the nvtrust form: evidence as base64 of raw bytes, certificate as base64 of PEM."""
        return json.dumps(
            {
                "nonce": self.nonce.hex(),
                "evidence_list": [
                    {
                        "certificate": base64.b64encode(e.certificate_chain_pem).decode("ascii"),
                        "evidence": base64.b64encode(e.evidence).decode("ascii"),
                        "arch": e.arch,
                    }
                    for e in self.entries
                ],
                "arch": self.arch,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> NvidiaPayload:
        """Read either evidence form seen in the wild (see :func:`decode_evidence`)."""
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise NvidiaPayloadError(f"nvidia_payload is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise NvidiaPayloadError("nvidia_payload must be a JSON object")
        arch, nonce_hex, items = obj.get("arch"), obj.get("nonce"), obj.get("evidence_list")
        if not isinstance(arch, str):
            raise NvidiaPayloadError("nvidia_payload.arch must be a string such as 'HOPPER'")
        try:
            nonce = bytes.fromhex(nonce_hex) if isinstance(nonce_hex, str) else b""
        except ValueError:
            nonce = b""
        if len(nonce) != NONCE_SIZE:
            raise NvidiaPayloadError(f"nvidia_payload.nonce must be {NONCE_SIZE * 2} hex digits")
        if not isinstance(items, list) or not items:
            raise NvidiaPayloadError("nvidia_payload.evidence_list must be a non-empty list")
        entries = []
        for index, item in enumerate(items):
            where = f"nvidia_payload.evidence_list[{index}]"
            if not isinstance(item, dict):
                raise NvidiaPayloadError(f"{where} must be an object")
            evidence, certificate = item.get("evidence"), item.get("certificate")
            entry_arch = item.get("arch", arch)
            if not isinstance(evidence, str) or not isinstance(certificate, str):
                raise NvidiaPayloadError(f"{where} needs string 'evidence' and 'certificate'")
            if not isinstance(entry_arch, str):
                raise NvidiaPayloadError(f"{where}.arch must be a string")
            try:
                pem = base64.b64decode(certificate, validate=True)
                raw = decode_evidence(evidence)
            except (binascii.Error, ValueError) as exc:
                raise NvidiaPayloadError(f"{where}: {exc}") from None
            if b"-----BEGIN CERTIFICATE-----" not in pem:
                raise NvidiaPayloadError(f"{where}.certificate is not base64 of a PEM chain")
            entries.append(GpuEvidenceEntry(evidence=raw, certificate_chain_pem=pem, arch=entry_arch))
        return cls(nonce=nonce, entries=tuple(entries), arch=arch)


def check_nonce(nonce: bytes) -> bytes:
    """The 32-byte nonce GPU evidence is requested with, or ValueError."""
    if not isinstance(nonce, bytes | bytearray | memoryview) or len(nonce) != NONCE_SIZE:
        size = len(nonce) if isinstance(nonce, bytes | bytearray | memoryview) else type(nonce).__name__
        raise ValueError(f"GPU evidence nonce must be {NONCE_SIZE} bytes, got {size}")
    return bytes(nonce)
