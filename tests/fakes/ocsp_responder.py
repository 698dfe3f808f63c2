"""A faithful stand-in for NVIDIA's OCSP responder over simulated chains.

It reads real DER requests (cryptography's parser), answers with real DER responses
(``OCSPResponseBuilder``) signed by the issuer's key, or by a delegated responder certificate
it carries, and echoes the request's nonce. Each knob makes it misbehave in one way a real or
hostile responder could. Use it as ``httpx.Client(transport=httpx.MockTransport(responder))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

_DER = serialization.Encoding.DER


@dataclass
class FakeOcspResponder:
    """Answers for the certificates of ``chains`` (leaf first, with their private keys, leaf first)."""

    chains: Sequence[tuple[Sequence[x509.Certificate], Sequence[ec.EllipticCurvePrivateKey]]]
    now: datetime
    status: dict[int, tuple[ocsp.OCSPCertStatus, x509.ReasonFlags | None]] = field(default_factory=dict)
    nonce: str = "echo"  # "echo", "omit" or "wrong"
    this_update: timedelta = timedelta(hours=-1)  # relative to ``now``
    next_update: timedelta | None = timedelta(days=7)
    other_serial: bool = False  # answer about another certificate of the same issuer
    signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None  # a delegate
    include_signer: bool = True  # whether the delegate's certificate travels in the response
    unsuccessful: ocsp.OCSPResponseStatus | None = None
    http_status: int = 200
    requests: list[ocsp.OCSPRequest] = field(default_factory=list)

    def _issuer_of(
        self, serial: int
    ) -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
        for certs, keys in self.chains:
            for position, cert in enumerate(certs[:-1]):
                if cert.serial_number == serial:
                    return cert, certs[position + 1], keys[position + 1]
        raise KeyError(serial)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.headers["content-type"] == "application/ocsp-request"
        if self.http_status != 200:
            return httpx.Response(self.http_status)
        asked = ocsp.load_der_ocsp_request(request.content)
        self.requests.append(asked)
        if self.unsuccessful is not None:
            der = ocsp.OCSPResponseBuilder.build_unsuccessful(self.unsuccessful)
            return httpx.Response(200, content=der.public_bytes(_DER))
        cert, issuer, issuer_key = self._issuer_of(asked.serial_number)
        if self.other_serial:
            cert = _sibling(issuer, issuer_key, self.now)
        status, reason = self.status.get(cert.serial_number, (ocsp.OCSPCertStatus.GOOD, None))
        revoked = status is ocsp.OCSPCertStatus.REVOKED
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=cert, issuer=issuer, algorithm=asked.hash_algorithm, cert_status=status,
            this_update=self.now + self.this_update,
            next_update=None if self.next_update is None else self.now + self.next_update,
            revocation_time=self.now - timedelta(days=30) if revoked else None,
            revocation_reason=reason if revoked else None,
        )  # fmt: skip
        responder_cert, key = (issuer, issuer_key) if self.signer is None else self.signer
        if self.signer is not None and self.include_signer:
            builder = builder.certificates([responder_cert])
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder_cert)
        nonce = asked.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        if self.nonce == "echo":
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        elif self.nonce == "wrong":
            builder = builder.add_extension(x509.OCSPNonce(bytes(32)), critical=False)
        return httpx.Response(200, content=builder.sign(key, hashes.SHA384()).public_bytes(_DER))


def _sibling(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    """Another certificate under ``issuer``: its status is no answer about the one asked."""
    return delegate(issuer, key, now, ocsp_signing=False)[0]


def delegate(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    *,
    ocsp_signing: bool = True,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A responder certificate issued by ``issuer``, with (or without) id-kp-OCSPSigning."""
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "SIMULATED OCSP Responder")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
    )
    if ocsp_signing:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA384()), key
