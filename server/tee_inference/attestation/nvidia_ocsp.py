"""Revocation of NVIDIA device and RIM certificates through NVIDIA's OCSP responder.

Request (as NVIDIA's local GPU verifier builds it): one CertID hashed with SHA-384 and a
random 32-byte nonce extension, POSTed as ``application/ocsp-request`` to
``https://ocsp.ndis.nvidia.com/``. A response counts only when its status is successful, it
answers that CertID, it echoes the nonce, ``thisUpdate``/``nextUpdate`` enclose the time asked,
and it is signed by the certificate's issuer or by a delegated responder (``id-kp-OCSPSigning``)
whose own chain leads to the same root. ``revoked`` fails; ``certificateHold`` fails too unless
the caller allows it (NVIDIA's Python verifier tolerates hold for every chain once enabled; we
allow it only where asked).

Which certificates: a device chain from index 1 up to, not including, the root (the leaf is
not in NVIDIA's OCSP service); a RIM chain from index 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from tee_inference.attestation.nvidia_rim import HttpClient
from tee_inference.attestation.nvidia_spdm import GpuAttestationError

NVIDIA_OCSP_URL: Final = "https://ocsp.ndis.nvidia.com/"
OCSP_NONCE_SIZE: Final = 32
CLOCK_SKEW: Final = timedelta(minutes=5)
MAX_AGE_WITHOUT_NEXT_UPDATE: Final = timedelta(days=1)  # a response that names no expiry is fresh a day
_MAX_PATH: Final = 6


class OcspError(GpuAttestationError):
    """An OCSP response cannot be trusted or does not say ``good``."""


@dataclass(frozen=True)
class OcspStatus:
    """A trusted answer: ``good``, or ``on hold`` where the caller allowed hold."""

    serial: int
    status: str
    this_update: datetime
    next_update: datetime | None


def build_ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes) -> bytes:
    """DER of an OCSP request for ``cert`` (SHA-384 CertID) carrying ``nonce``."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA384())
    return (
        builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def _verify_signed_by(signed: ocsp.OCSPResponse | x509.Certificate, signer: x509.Certificate) -> bool:
    key = signer.public_key()
    if isinstance(signed, x509.Certificate):
        try:
            signed.verify_directly_issued_by(signer)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True
    algorithm = signed.signature_hash_algorithm
    if not isinstance(key, ec.EllipticCurvePublicKey) or algorithm is None:
        return False  # NVIDIA's PKI is ECDSA throughout
    try:
        key.verify(signed.signature, signed.tbs_response_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        return False
    return True


def _chains_to(cert: x509.Certificate, pool: Sequence[x509.Certificate], root: x509.Certificate) -> bool:
    """Whether ``cert`` leads to ``root`` through certificates of ``pool``, each signing the one below."""
    current = cert
    for _ in range(_MAX_PATH):
        if _verify_signed_by(current, root):
            return True
        issuer = next(
            (c for c in pool if c.subject == current.issuer and _verify_signed_by(current, c)), None
        )
        if issuer is None or issuer == current:
            return False
        current = issuer
    return False


def _responder(
    response: ocsp.OCSPResponse, issuer: x509.Certificate, pool: Sequence[x509.Certificate],
    root: x509.Certificate, at: datetime,
) -> x509.Certificate:  # fmt: skip
    """The certificate that signed ``response``: the issuer itself, or a delegate chaining to ``root``."""
    if _verify_signed_by(response, issuer):
        return issuer
    for candidate in response.certificates:
        if not _verify_signed_by(response, candidate):
            continue
        name = candidate.subject.rfc4514_string()
        try:
            usages = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.OCSP_SIGNING not in usages:
            raise OcspError(f"responder {name} is not authorised to sign OCSP (no id-kp-OCSPSigning)")
        if not candidate.not_valid_before_utc <= at <= candidate.not_valid_after_utc:
            raise OcspError(f"responder certificate {name} is not valid at {at.isoformat()}")
        if not _chains_to(candidate, (*pool, *response.certificates), root):
            raise OcspError(f"responder {name} does not chain to {root.subject.rfc4514_string()}")
        return candidate
    raise OcspError("response is signed neither by the issuer nor by a responder certificate it carries")


def check_ocsp_response(
    der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    nonce: bytes,
    root: x509.Certificate,
    at: datetime,
    chain: Sequence[x509.Certificate] = (),
    allow_hold: bool = False,
) -> OcspStatus:
    """Judge one DER response about ``cert``; ``chain`` lends intermediates for a delegate's path."""
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise OcspError(f"not an OCSP response: {exc}") from None
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspError(f"responder answered {response.response_status.name}")
    _responder(response, issuer, (*chain, issuer), root, at)
    try:
        echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        raise OcspError("response carries no nonce: it may be a replay") from None
    if echoed != nonce:
        raise OcspError("response nonce is not the one asked for: it may be a replay")
    request = ocsp.load_der_ocsp_request(build_ocsp_request(cert, issuer, nonce))
    single = next(
        (
            r for r in response.responses
            if r.serial_number == cert.serial_number and r.issuer_key_hash == request.issuer_key_hash
            and r.issuer_name_hash == request.issuer_name_hash
            and isinstance(r.hash_algorithm, type(request.hash_algorithm))
        ),
        None,
    )  # fmt: skip
    if single is None:
        raise OcspError(f"response is not about serial {cert.serial_number:x} under this issuer")
    this_update, next_update = single.this_update_utc, single.next_update_utc
    if this_update > at + CLOCK_SKEW:
        raise OcspError(f"response thisUpdate {this_update.isoformat()} is after {at.isoformat()}")
    if next_update is not None and at > next_update + CLOCK_SKEW:
        raise OcspError(f"response expired at its nextUpdate {next_update.isoformat()}")
    if next_update is None and at - this_update > MAX_AGE_WITHOUT_NEXT_UPDATE:
        raise OcspError(f"response of {this_update.isoformat()} names no nextUpdate and is over a day old")
    status = single.certificate_status
    if status is ocsp.OCSPCertStatus.GOOD:
        return OcspStatus(cert.serial_number, "good", this_update, next_update)
    if status is ocsp.OCSPCertStatus.UNKNOWN:
        raise OcspError("responder does not know this certificate")
    reason = single.revocation_reason
    when = single.revocation_time_utc
    if reason is x509.ReasonFlags.certificate_hold and allow_hold:
        return OcspStatus(cert.serial_number, "on hold (allowed by policy)", this_update, next_update)
    name = reason.name if reason is not None else "unspecified"
    raise OcspError(f"revoked ({name}) at {when.isoformat() if when else 'an unstated time'}")


def revocation_targets(
    chain: Sequence[x509.Certificate], root: x509.Certificate, *, first: int
) -> list[tuple[int, x509.Certificate, x509.Certificate]]:
    """``(position, certificate, issuer)`` for ``chain[first:]`` below the root, each under the next.

    When the chain stops short of ``root``, its last certificate is asked about under ``root``.
    """
    path = list(chain)
    if path and path[-1] != root:
        path.append(root)
    return [(i, path[i], path[i + 1]) for i in range(first, len(path) - 1)]


def ask_ocsp(
    client: HttpClient,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    root: x509.Certificate,
    at: datetime,
    chain: Sequence[x509.Certificate] = (),
    allow_hold: bool = False,
    url: str = NVIDIA_OCSP_URL,
) -> OcspStatus:
    """POST one request with a fresh nonce through ``client`` and judge the answer."""
    nonce = os.urandom(OCSP_NONCE_SIZE)
    reply = client.post(
        url,
        content=build_ocsp_request(cert, issuer, nonce),
        headers={"content-type": "application/ocsp-request"},
    )
    if reply.status_code != 200:
        raise OcspError(f"HTTP {reply.status_code} from {url}")
    return check_ocsp_response(
        reply.content, cert, issuer, nonce=nonce, root=root, at=at, chain=chain, allow_hold=allow_hold
    )
