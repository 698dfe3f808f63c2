"""Pinning a TLS connection to an attested key: the SPKI is checked during the handshake.

A TLS connection to a confidential server is trusted because its key is the one the quote binds
(the report's ``tls_cert_fingerprint``, recorded in RTMR3 at boot), not because a certificate
authority signed it. ``SpkiPin`` makes an ``ssl.SSLContext`` whose sockets record every peer's SPKI
hash and, once a pin is set, fail the handshake on any other key — before a single request byte is
sent. It works for httpx's sync transport (``SSLContext.wrap_socket``) and its async one
(``wrap_bio``, as anyio uses), through the context's ``sslsocket_class`` and ``sslobject_class``.

The fingerprint is sha256 over the peer certificate's DER SubjectPublicKeyInfo, as nearai's
verifier and Tinfoil's client compute it.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import threading
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization


class PinMismatchError(ssl.SSLError):
    """The server presented a TLS key other than the attested one."""


def spki_sha256_of_der(certificate_der: bytes) -> bytes:
    certificate = x509.load_der_x509_certificate(certificate_der)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


class SpkiPin:
    """Records the SPKI of every TLS peer; with ``expected`` set, refuses any other at handshake."""

    def __init__(self, expected: bytes | None = None) -> None:
        self.expected = expected
        self.seen: list[bytes] = []
        self._lock = threading.Lock()
        self.context = self._context()

    def pin(self, expected: bytes) -> None:
        self.expected = expected

    @property
    def last_seen(self) -> bytes | None:
        with self._lock:
            return self.seen[-1] if self.seen else None

    def check(self, certificate_der: bytes | None) -> None:
        if certificate_der is None:
            raise PinMismatchError("the server presented no certificate")
        spki = spki_sha256_of_der(certificate_der)
        with self._lock:
            self.seen.append(spki)
        expected = self.expected
        if expected is not None and not hmac.compare_digest(spki, expected):
            raise PinMismatchError(
                f"TLS peer key SPKI sha256 {spki.hex()} is not the attested {expected.hex()}: "
                "a TLS-terminating relay, or a server that was not attested"
            )

    def _context(self) -> ssl.SSLContext:
        pin = self
        # Trust comes from the attestation, not from a CA: the certificate may be self-signed.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_2

        class PinnedSocket(ssl.SSLSocket):
            def do_handshake(self, block: bool = False) -> None:
                super().do_handshake(block)
                pin.check(self.getpeercert(binary_form=True))

        class PinnedObject(ssl.SSLObject):
            def do_handshake(self) -> Any:
                result = super().do_handshake()  # raises SSLWantReadError until the handshake is done
                pin.check(self.getpeercert(binary_form=True))
                return result

        context.sslsocket_class = PinnedSocket
        context.sslobject_class = PinnedObject
        return context
