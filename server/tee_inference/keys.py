"""Where the boot signing key comes from, and how both algorithm keys derive from it.

A key source yields one root secret per boot; HKDF turns it into a secp256k1 key and an
ed25519 key. Deriving both from one secret means a source that is deterministic (a CVM's
key service) gives the same identity after a restart, and the epoch in the HKDF info lets an
operator rotate to a fresh identity without a new source.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tee_inference.exceptions import KeySourceError
from tee_inference.signing import SECP256K1_ORDER, CompletionSigner, EcdsaSigner, Ed25519Signer

if TYPE_CHECKING:
    from tee_inference.config import ServerConfig
    from tee_inference.tls import TlsService

_HKDF_SALT = b"tee-inference/signing-key/v1"
_P256_ORDER: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class KeySource(Protocol):
    """A trust root for the signing key: produces this boot's root secret."""

    name: str
    development_only: bool

    def root_secret(self) -> bytes: ...


class RandomKeySource:
    """A fresh key every boot: nothing outside the process ever sees it."""

    name = "random"
    development_only = False

    def root_secret(self) -> bytes:
        return secrets.token_bytes(32)


class FileKeySource:
    """A root secret read from a file of 64 hex characters. For development only."""

    name = "file"
    development_only = True

    def __init__(self, path: Path) -> None:
        self.path = path

    def root_secret(self) -> bytes:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeySourceError(f"cannot read key file {self.path}: {type(exc).__name__}") from None
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) != 32:
            raise KeySourceError(f"key file {self.path} must hold exactly 64 hex characters")
        return secret

    @staticmethod
    def create(path: Path) -> FileKeySource:
        """Write a new random secret readable by the owner only."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32) + "\n")
        return FileKeySource(path)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=info).derive(secret)


def derive_signer(secret: bytes, epoch: int) -> CompletionSigner:
    """Both signing keys of one epoch, derived from the root secret."""
    if len(secret) < 32:
        raise KeySourceError("a root secret must be at least 32 bytes")
    if epoch < 0:
        raise ValueError("the key epoch is a non-negative integer")
    # A 32-byte HKDF output is a valid secp256k1 scalar except with probability ~2^-128;
    # the counter keeps the derivation total and deterministic all the same.
    counter = 0
    while True:
        candidate = _hkdf(secret, b"secp256k1/epoch=%d/%d" % (epoch, counter))
        if 0 < int.from_bytes(candidate, "big") < SECP256K1_ORDER:
            break
        counter += 1
    ed_seed = _hkdf(secret, b"ed25519/epoch=%d" % epoch)
    return CompletionSigner(EcdsaSigner(candidate), Ed25519Signer(ed_seed), epoch)


def derive_tls_key(secret: bytes, epoch: int) -> ec.EllipticCurvePrivateKey:
    """This boot's P-256 TLS key: from the same root, under its own label, so a CA-issued
    certificate for it stays valid across restarts when the key source is deterministic (dstack)."""
    scalar = int.from_bytes(_hkdf64(secret, b"tls-p256/epoch=%d" % epoch), "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def derive_e2ee_key(secret: bytes, epoch: int) -> X25519PrivateKey:
    """This boot's X25519 key for end-to-end encrypted bodies (HPKE), attested with the others."""
    return X25519PrivateKey.from_private_bytes(_hkdf(secret, b"e2ee-x25519/epoch=%d" % epoch))


def derive_cache_salt_key(secret: bytes, epoch: int) -> bytes:
    """The key that turns a tenant's name into its prefix-cache salt (cachesalt.py): the same in
    every API process of this boot, unknown outside the CVM, so no one can compute a salt."""
    return _hkdf(secret, b"cache-salt/epoch=%d" % epoch)


def _hkdf64(secret: bytes, info: bytes) -> bytes:
    # 64 bytes reduced modulo the order: the bias is below 2^-256, unlike 32 bytes for P-256.
    return HKDF(algorithm=hashes.SHA256(), length=64, salt=_HKDF_SALT, info=info).derive(secret)


def load_signer(source: KeySource, epoch: int) -> CompletionSigner:
    return derive_signer(source.root_secret(), epoch)


def make_key_source(config: ServerConfig) -> KeySource:
    """The key source the configuration names (the dstack client is imported only when used)."""
    if config.key_source == "random":
        return RandomKeySource()
    if config.key_source == "file":
        assert config.key_file is not None  # the config validator guarantees it
        return FileKeySource(config.key_file)
    from tee_inference.tee.dstack import DstackKeySource

    return DstackKeySource(config.dstack_socket, config.dstack_key_path)


@dataclass
class BootKeys:
    """Every key this boot uses, as one set: signing (both algorithms), body encryption, TLS.

    They are recorded together at boot as one RTMR3 keyset event, so a verifier ties each of them
    to the quote whichever report_data layout a client asked for.
    """

    signer: CompletionSigner
    e2ee: X25519PrivateKey = field(repr=False)
    tls: TlsService | None = None
    # Not a signing key and never published (so not in the keyset event): salts tenants' caches.
    cache_salt_key: bytes = field(default=b"", repr=False)

    @classmethod
    def derive(cls, secret: bytes, epoch: int, tls: TlsService | None) -> BootKeys:
        return cls(
            derive_signer(secret, epoch),
            derive_e2ee_key(secret, epoch),
            tls,
            derive_cache_salt_key(secret, epoch),
        )

    @property
    def e2ee_public_key(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.e2ee.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def keyset(self, key_source: str) -> dict[str, Any]:
        """The keyset event's payload: public parts only."""
        return {
            "address": self.signer.ecdsa.address,
            "ed25519_public_key": self.signer.ed25519.public_key.hex(),
            "e2ee_public_key": self.e2ee_public_key.hex(),
            "tls_spki_sha256": self.tls.spki_sha256.hex() if self.tls else None,
            "tls_mode": self.tls.mode if self.tls else "off",
            "epoch": self.signer.epoch,
            "key_source": key_source,
        }
