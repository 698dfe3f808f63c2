"""NVIDIA GPU device certificates: the pinned root, chain decoding and checks, the leaf's FWID.

A Hopper GPU returns five P-384 certificates, leaf first: ``GH100 A01 GSP FMC LF`` ->
``GH100 A01 GSP BROM`` -> ``NVIDIA GH100 Provisioner ICA 1`` -> ``NVIDIA GH100 Identity`` ->
``NVIDIA Device Identity CA`` (self-signed, the root pinned here). All of them are valid
until 9999-12-31.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tee_inference.attestation.nvidia_spdm import GpuAttestationError

NVIDIA_DEVICE_IDENTITY_CA_SHA256: Final = "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
_ROOT_RESOURCE: Final = ("data", "nvidia_device_identity_ca.pem")
# TCG DICE extension in NVIDIA leaf certificates; its SHA-384 FWID equals opaque field 20.
TCG_DICE_FWID_OID: Final = x509.ObjectIdentifier("2.23.133.5.4.1")
SHA384_OID_DER: Final = bytes.fromhex("0609608648016503040202")


class GpuCertificateChainError(GpuAttestationError):
    """A GPU certificate chain does not lead to the trust anchor."""


class GpuTrustAnchorError(GpuAttestationError):
    """The shipped NVIDIA root certificate is missing or not the pinned one."""


def _sha256_fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def load_nvidia_root() -> x509.Certificate:
    """The NVIDIA Device Identity CA shipped with the package, after checking its pin."""
    try:
        pem = resources.files("tee_inference").joinpath(*_ROOT_RESOURCE).read_bytes()
        root = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as exc:
        raise GpuTrustAnchorError(f"cannot load tee_inference/{'/'.join(_ROOT_RESOURCE)}: {exc}") from None
    actual = _sha256_fingerprint(root)
    if actual != NVIDIA_DEVICE_IDENTITY_CA_SHA256:
        raise GpuTrustAnchorError(
            f"shipped NVIDIA root has sha256 {actual}, pinned {NVIDIA_DEVICE_IDENTITY_CA_SHA256}; "
            "the package data was altered, reinstall"
        )
    return root


def decode_certificate_chain(b64_or_pem: str | bytes) -> list[x509.Certificate]:
    """Certificates, leaf first, from PEM text or base64 of PEM text (the NRAS form)."""
    try:
        data = b64_or_pem.encode("ascii") if isinstance(b64_or_pem, str) else bytes(b64_or_pem)
        if b"-----BEGIN" not in data:
            data = base64.b64decode(b"".join(data.split()), validate=True)
        certs = x509.load_pem_x509_certificates(data)
    except (binascii.Error, ValueError) as exc:
        raise GpuCertificateChainError(f"certificate chain is neither PEM nor base64 of PEM: {exc}") from None
    return certs


@dataclass(frozen=True)
class ChainResult:
    """A chain that verified: each certificate signed by the next, the last by (or equal to) the anchor."""

    certificates: tuple[x509.Certificate, ...]
    anchor: x509.Certificate
    anchor_in_chain: bool
    checked_at: datetime | None

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(c.subject.rfc4514_string() for c in self.certificates)

    @property
    def not_after(self) -> datetime:
        """When the first certificate of the path (anchor included) expires."""
        return min(c.not_valid_after_utc for c in (*self.certificates, self.anchor))


def _chain_error(position: int, cert: x509.Certificate, detail: str) -> GpuCertificateChainError:
    return GpuCertificateChainError(f"certificate {position} ({cert.subject.rfc4514_string()}): {detail}")


def _check_issuer(position: int, cert: x509.Certificate, issuer: x509.Certificate, role: str) -> None:
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise _chain_error(position, cert, f"its {role} {issuer.subject.rfc4514_string()} is not a CA")
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError) as exc:  # issuer name mismatch or an unsupported key type
        raise _chain_error(position, cert, f"not issued by its {role}: {exc}") from None
    except InvalidSignature:
        raise _chain_error(position, cert, f"signature does not verify under its {role}") from None


def verify_certificate_chain(
    chain: list[x509.Certificate] | tuple[x509.Certificate, ...],
    trust_anchor: x509.Certificate,
    *,
    at: datetime | None = None,
) -> ChainResult:
    """Check that ``chain`` (leaf first) leads to ``trust_anchor``.

    Validity periods are checked only when ``at`` (timezone-aware) is given; NVIDIA's device
    certificates run to 9999-12-31, so expiry is reported in the result rather than assumed.
    """
    certs = tuple(chain)
    if not certs:
        raise GpuCertificateChainError("certificate chain is empty")
    for position in range(len(certs) - 1):
        _check_issuer(position, certs[position], certs[position + 1], "next certificate")
    last = len(certs) - 1
    anchor_in_chain = _sha256_fingerprint(certs[last]) == _sha256_fingerprint(trust_anchor)
    if not anchor_in_chain:
        try:
            _check_issuer(last, certs[last], trust_anchor, "trust anchor")
        except GpuCertificateChainError as exc:
            raise GpuCertificateChainError(
                f"{exc}; the chain does not end at the trust anchor {trust_anchor.subject.rfc4514_string()}"
            ) from None
    if at is not None:
        if at.tzinfo is None:
            raise ValueError("'at' must be timezone-aware")
        for position, cert in enumerate((*certs, trust_anchor)):
            if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
                detail = (
                    f"not valid at {at.isoformat()} (valid {cert.not_valid_before_utc.isoformat()} "
                    f"to {cert.not_valid_after_utc.isoformat()})"
                )
                if position == len(certs):
                    raise GpuCertificateChainError(
                        f"trust anchor ({cert.subject.rfc4514_string()}): {detail}"
                    )
                raise _chain_error(position, cert, detail)
    return ChainResult(certs, trust_anchor, anchor_in_chain, at)


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) pairs at one level of DER; enough for the small FWID extension."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 2 > len(data):
            raise ValueError("truncated DER")
        tag, length = data[offset], data[offset + 1]
        offset += 2
        if length & 0x80:
            size = length & 0x7F
            length = int.from_bytes(data[offset : offset + size], "big")
            offset += size
        if offset + length > len(data):
            raise ValueError("truncated DER")
        items.append((tag, data[offset : offset + length]))
        offset += length
    return items


def certificate_fwid(cert: x509.Certificate) -> bytes | None:
    """The SHA-384 FWID in a leaf's TCG DICE extension, or None when there is none.

    The GPU repeats it in opaque field 20, so a verifier can check that the evidence and the
    leaf certificate describe the same firmware.
    """
    try:
        ext = cert.extensions.get_extension_for_oid(TCG_DICE_FWID_OID).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(ext, x509.UnrecognizedExtension):
        return None
    try:
        ((_, body),) = _der_items(ext.value)
        for tag, content in _der_items(body):
            if tag == 0x30 and content.startswith(SHA384_OID_DER):
                ((octet_tag, digest),) = _der_items(content[len(SHA384_OID_DER) :])
                if octet_tag == 0x04:
                    return digest
    except ValueError:
        return None
    return None


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    length = bytes((size,)) if size < 0x80 else bytes((0x80 | 2,)) + size.to_bytes(2, "big")
    return bytes((tag,)) + length + content


def encode_fwid_extension(public_key: ec.EllipticCurvePublicKey, fwid: bytes) -> x509.UnrecognizedExtension:
    """A TCG DICE extension in the shape NVIDIA leaf certificates carry (for the simulator)."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fwids = _der(0x30, SHA384_OID_DER + _der(0x04, fwid))
    return x509.UnrecognizedExtension(TCG_DICE_FWID_OID, _der(0x30, _der(0x02, b"\x01") + spki + fwids))
