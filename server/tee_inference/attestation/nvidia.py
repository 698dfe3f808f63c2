"""NVIDIA GPU evidence: the NRAS v3 payload, a simulated GPU, and one import point for the rest.

The binary report layout lives in :mod:`nvidia_spdm`, certificates and the pinned root in
:mod:`nvidia_certs`, NRAS replies in :mod:`nvidia_nras`; all are re-exported here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tee_inference.attestation.nvidia_certs import (
    NVIDIA_DEVICE_IDENTITY_CA_SHA256,
    ChainResult,
    GpuCertificateChainError,
    GpuTrustAnchorError,
    certificate_fwid,
    decode_certificate_chain,
    encode_fwid_extension,
    load_nvidia_root,
    verify_certificate_chain,
)
from tee_inference.attestation.nvidia_nras import (
    Jwt,
    NrasGpuResult,
    NrasResponseError,
    NrasResult,
    NrasSignatureError,
    decode_jwt,
    parse_nras_response,
    verify_nras_jwt,
)
from tee_inference.attestation.nvidia_spdm import (
    GET_MEASUREMENTS,
    NONCE_SIZE,
    OPAQUE_FIELD_BOARD_ID,
    OPAQUE_FIELD_CHIP_SKU,
    OPAQUE_FIELD_CHIP_SKU_MOD,
    OPAQUE_FIELD_CPRINFO,
    OPAQUE_FIELD_DRIVER_VERSION,
    OPAQUE_FIELD_FWID,
    OPAQUE_FIELD_GPU_INFO,
    OPAQUE_FIELD_MSRSCNT,
    OPAQUE_FIELD_NVDEC0_STATUS,
    OPAQUE_FIELD_PROJECT,
    OPAQUE_FIELD_PROJECT_SKU,
    OPAQUE_FIELD_PROJECT_SKU_MOD,
    OPAQUE_FIELD_PROTECTED_PCIE_STATUS,
    OPAQUE_FIELD_VBIOS_VERSION,
    GpuAttestationError,
    GpuEvidence,
    GpuEvidenceFormatError,
    GpuEvidenceSignatureError,
    GpuNonceMismatchError,
    MeasurementBlock,
    OpaqueField,
    encode_measurement_request,
    encode_measurements_response,
    encode_opaque_fields,
    encode_vbios_version,
    parse_gpu_evidence,
    verify_evidence_nonce,
    verify_evidence_signature,
)

__all__ = [
    "NVIDIA_DEVICE_IDENTITY_CA_SHA256",
    "OPAQUE_FIELD_DRIVER_VERSION",
    "OPAQUE_FIELD_FWID",
    "OPAQUE_FIELD_VBIOS_VERSION",
    "ChainResult",
    "GpuAttestationError",
    "GpuCertificateChainError",
    "GpuEvidence",
    "GpuEvidenceEntry",
    "GpuEvidenceFormatError",
    "GpuEvidenceSignatureError",
    "GpuNonceMismatchError",
    "GpuTrustAnchorError",
    "Jwt",
    "MeasurementBlock",
    "NrasGpuResult",
    "NrasResponseError",
    "NrasResult",
    "NrasSignatureError",
    "NvidiaPayload",
    "NvidiaPayloadError",
    "OpaqueField",
    "SimulatedGpu",
    "certificate_fwid",
    "decode_certificate_chain",
    "decode_evidence",
    "decode_jwt",
    "load_nvidia_root",
    "parse_gpu_evidence",
    "parse_nras_response",
    "verify_certificate_chain",
    "verify_evidence_nonce",
    "verify_evidence_signature",
    "verify_nras_jwt",
]

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


# Simulation: the same shapes, signed by a local chain whose names all say SIMULATED.

_P384_ORDER: Final = (
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
)
_SIM_NOT_BEFORE: Final = datetime(2024, 1, 1, tzinfo=UTC)
_SIM_NOT_AFTER: Final = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)  # as NVIDIA's device certificates
_SIM_SUBJECTS: Final = (  # root first, mirroring the five-certificate Hopper chain
    "SIMULATED NVIDIA Device Identity CA",
    "SIMULATED NVIDIA GH100 Identity",
    "SIMULATED NVIDIA GH100 Provisioner ICA 1",
    "SIMULATED GH100 A01 GSP BROM",
    "SIMULATED GH100 A01 GSP FMC LF",
)
_SIM_MEASUREMENT_BLOCKS: Final = 64  # as many as a Hopper report
_SIM_DMTF_MUTABLE_FIRMWARE: Final = 0x01


@dataclass(frozen=True)
class _SimCert:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


class SimulatedGpu:
    """A stand-in GPU that answers with byte-exact SPDM evidence under a SIMULATED P-384 chain.

    With a 32-byte ``seed`` the keys, certificates and evidence are deterministic; without
    one they are fresh for each instance.
    """

    def __init__(
        self,
        seed: bytes | None = None,
        *,
        driver_version: str = "550.90.07",
        vbios_version: str = "96.00.9F.00.01",
    ) -> None:
        if seed is not None and len(seed) != 32:
            raise ValueError(f"seed must be 32 bytes, got {len(seed)}")
        # Fail here, not at the first evidence() call.
        encode_vbios_version(vbios_version)
        driver_version.encode("ascii")
        self._secret = bytes(seed) if seed is not None else os.urandom(32)
        self._driver_version = driver_version
        self._vbios_version = vbios_version
        self._chain = self._build_chain()

    @property
    def driver_version(self) -> str:
        return self._driver_version

    @property
    def vbios_version(self) -> str:
        return self._vbios_version

    def _derive(self, label: str, size: int = 48) -> bytes:
        return hmac.new(self._secret, label.encode("ascii"), hashlib.sha512).digest()[:size]

    def _build_chain(self) -> tuple[_SimCert, ...]:
        made: list[_SimCert] = []
        for depth, cn in enumerate(_SIM_SUBJECTS):
            scalar = int.from_bytes(self._derive(f"key {depth}", 64), "big") % (_P384_ORDER - 1) + 1
            key = ec.derive_private_key(scalar, ec.SECP384R1())
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SIMULATED (not NVIDIA)"),
                ]
            )
            issuer = made[-1] if made else None
            is_leaf = depth == len(_SIM_SUBJECTS) - 1
            builder = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(issuer.certificate.subject if issuer else name)
                .public_key(key.public_key())
                .serial_number(int.from_bytes(self._derive(f"serial {depth}", 19), "big") | 1)
                .not_valid_before(_SIM_NOT_BEFORE)
                .not_valid_after(_SIM_NOT_AFTER)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(
                        (issuer.key if issuer else key).public_key()
                    ),
                    critical=False,
                )
            )
            if is_leaf:
                builder = builder.add_extension(
                    x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
                ).add_extension(encode_fwid_extension(key.public_key(), self.fwid), critical=False)
            else:
                builder = builder.add_extension(
                    x509.BasicConstraints(ca=True, path_length=None), critical=True
                )
                builder = builder.add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, False, False, False), critical=True
                )
            cert = builder.sign((issuer.key if issuer else key), hashes.SHA384(), ecdsa_deterministic=True)
            made.append(_SimCert(key, cert))
        return tuple(reversed(made))  # leaf first

    @property
    def fwid(self) -> bytes:
        return hashlib.sha384(b"SIMULATED GPU firmware " + self._derive("fwid")).digest()

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._chain[-1].certificate

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return tuple(c.certificate for c in self._chain)

    def certificate_chain_pem(self) -> bytes:
        """PEM, leaf first, root last, as a real GPU's chain."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.certificates)

    def _opaque(self) -> bytes:
        # Same fields, in the same order, as a Hopper report; values other than the
        # versions and FWID are fixed placeholders.
        fields = (
            OpaqueField(OPAQUE_FIELD_VBIOS_VERSION, encode_vbios_version(self.vbios_version)),
            OpaqueField(OPAQUE_FIELD_BOARD_ID, bytes(4)),
            OpaqueField(OPAQUE_FIELD_CHIP_SKU, b"SIM".ljust(9, b"\x00")),
            OpaqueField(OPAQUE_FIELD_CHIP_SKU_MOD, b"0".ljust(5, b"\x00")),
            OpaqueField(OPAQUE_FIELD_PROJECT, b"SIM".ljust(5, b"\x00")),
            OpaqueField(OPAQUE_FIELD_PROJECT_SKU, b"SIM".ljust(5, b"\x00")),
            OpaqueField(OPAQUE_FIELD_PROJECT_SKU_MOD, bytes(2)),
            OpaqueField(OPAQUE_FIELD_DRIVER_VERSION, self.driver_version.encode("ascii") + b"\x00"),
            OpaqueField(OPAQUE_FIELD_GPU_INFO, bytes(8)),
            OpaqueField(OPAQUE_FIELD_MSRSCNT, bytes(256)),
            OpaqueField(OPAQUE_FIELD_CPRINFO, bytes(4)),
            OpaqueField(OPAQUE_FIELD_NVDEC0_STATUS, b"\x55"),
            OpaqueField(OPAQUE_FIELD_FWID, self.fwid),
            OpaqueField(OPAQUE_FIELD_PROTECTED_PCIE_STATUS, b"\x55"),
        )
        return encode_opaque_fields(fields)

    def measurements(self) -> tuple[MeasurementBlock, ...]:
        """Deterministic digests that depend only on the block index and the versions."""
        tag = f"SIMULATED GPU measurement {self.driver_version} {self.vbios_version} ".encode("ascii")
        return tuple(
            MeasurementBlock(
                index, _SIM_DMTF_MUTABLE_FIRMWARE, hashlib.sha384(tag + bytes((index,))).digest()
            )
            for index in range(1, _SIM_MEASUREMENT_BLOCKS + 1)
        )

    def evidence(self, nonce: bytes) -> bytes:
        """A signed attestation report answering a GET_MEASUREMENTS request with ``nonce``."""
        request = encode_measurement_request(nonce)
        response_nonce = self._derive("response nonce " + nonce.hex(), NONCE_SIZE)
        body = request + encode_measurements_response(self.measurements(), response_nonce, self._opaque())
        # RFC 6979 signing, so that a seed fixes the whole report, signature included.
        der = self._chain[0].key.sign(body, ec.ECDSA(hashes.SHA384(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        return body + r.to_bytes(48, "big") + s.to_bytes(48, "big")

    def payload(self, nonce: bytes) -> NvidiaPayload:
        """The NRAS v3 payload for one simulated GPU."""
        entry = GpuEvidenceEntry(self.evidence(nonce), self.certificate_chain_pem())
        return NvidiaPayload(nonce=bytes(nonce), entries=(entry,))
