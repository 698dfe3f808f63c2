"""Signing primitives: the text we sign, EIP-191 ecdsa over secp256k1, and ed25519.

The ecdsa path uses coincurve (libsecp256k1) directly rather than eth-account because it
is an order of magnitude faster per signature and runs on every completion; a test proves
the two produce byte-identical signatures. eth-account stays the reference for recovery.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final, Literal

import coincurve
from Crypto.Hash import keccak
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from eth_utils.address import to_checksum_address

SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

# The two signature algorithms of SPEC §2, named as the API names them.
SigningAlgo = Literal["ecdsa", "ed25519"]
SIGNING_ALGOS: Final[tuple[SigningAlgo, ...]] = ("ecdsa", "ed25519")


def parse_signing_algo(value: object) -> SigningAlgo | None:
    """The algorithm a request or report names, or None when it names none of ours."""
    if value == "ecdsa":
        return "ecdsa"
    if value == "ed25519":
        return "ed25519"
    return None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def signature_text(request_sha256_hex: str, response_sha256_hex: str) -> str:
    """The text every completion signature covers (SPEC §2)."""
    return f"{request_sha256_hex}:{response_sha256_hex}"


def keccak256(data: bytes) -> bytes:
    return keccak.new(data=data, digest_bits=256).digest()


def eip191_digest(message: bytes) -> bytes:
    """The hash `personal_sign` signs: keccak256 of the prefixed message (EIP-191 version 0x45)."""
    prefix = b"\x19Ethereum Signed Message:\n" + str(len(message)).encode("ascii")
    return keccak256(prefix + message)


def address_of(public_key: coincurve.PublicKey) -> bytes:
    """The 20-byte Ethereum address of a secp256k1 public key."""
    return keccak256(public_key.format(compressed=False)[1:])[-20:]


def checksum_address(address: bytes) -> str:
    if len(address) != 20:
        raise ValueError(f"an address is 20 bytes, got {len(address)}")
    return str(to_checksum_address(address))


class EcdsaSigner:
    """secp256k1 EIP-191 signer. The private scalar is held only inside the coincurve object."""

    __slots__ = ("_key", "address", "public_key")

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != 32 or not 0 < int.from_bytes(private_key, "big") < SECP256K1_ORDER:
            raise ValueError("not a valid secp256k1 private key")
        self._key = coincurve.PrivateKey(private_key)
        self.public_key: bytes = self._key.public_key.format(compressed=False)
        self.address: str = checksum_address(address_of(self._key.public_key))

    def sign(self, text: str) -> bytes:
        """65 bytes r‖s‖v with v in {27, 28}, as eth-account's `sign_message` returns."""
        rs_recid = self._key.sign_recoverable(eip191_digest(text.encode("utf-8")), hasher=None)
        return rs_recid[:64] + bytes([rs_recid[64] + 27])

    def __repr__(self) -> str:
        return f"EcdsaSigner(address={self.address})"


class Ed25519Signer:
    """RFC 8032 ed25519 signer over the UTF-8 text."""

    __slots__ = ("_key", "public_key")

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != 32:
            raise ValueError("an ed25519 private key is 32 bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(private_key)
        self.public_key: bytes = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, text: str) -> bytes:
        return self._key.sign(text.encode("utf-8"))

    def __repr__(self) -> str:
        return f"Ed25519Signer(public_key={self.public_key.hex()})"


def recover_ecdsa_address(text: str, signature: bytes) -> str:
    """The checksummed address that produced an EIP-191 signature of `text`."""
    if len(signature) != 65 or signature[64] not in (27, 28):
        raise ValueError("an ecdsa signature is 65 bytes r‖s‖v with v in {27, 28}")
    rs_recid = signature[:64] + bytes([signature[64] - 27])
    public_key = coincurve.PublicKey.from_signature_and_message(
        rs_recid, eip191_digest(text.encode("utf-8")), hasher=None
    )
    return checksum_address(address_of(public_key))


def ecdsa_signature_matches(text: str, signature: bytes, address: str) -> bool:
    try:
        recovered = recover_ecdsa_address(text, signature)
    except ValueError:
        return False
    return hmac.compare_digest(recovered.lower(), address.lower())


def ed25519_signature_matches(text: str, signature: bytes, public_key: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, text.encode("utf-8"))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class CompletionSignature:
    """Both signatures of one completion, with the public identity that made them."""

    text: str
    ecdsa: bytes
    ed25519: bytes
    signing_address: str
    ed25519_public_key: bytes

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """The ``X-Signature*`` headers of a whole (non-streamed) answer (SPEC §2)."""
        return [
            (b"x-signature-text", self.text.encode("ascii")),
            (b"x-signature", self.ecdsa.hex().encode("ascii")),
            (b"x-signing-address", self.signing_address.encode("ascii")),
            (b"x-signature-ed25519", self.ed25519.hex().encode("ascii")),
            (b"x-signing-public-key-ed25519", self.ed25519_public_key.hex().encode("ascii")),
        ]


class CompletionSigner:
    """Signs the request/response digest pair with both algorithms of one boot key."""

    __slots__ = ("ecdsa", "ed25519", "epoch")

    def __init__(self, ecdsa: EcdsaSigner, ed25519: Ed25519Signer, epoch: int) -> None:
        self.ecdsa = ecdsa
        self.ed25519 = ed25519
        self.epoch = epoch

    def sign(self, request_sha256_hex: str, response_sha256_hex: str) -> CompletionSignature:
        text = signature_text(request_sha256_hex, response_sha256_hex)
        return CompletionSignature(
            text=text,
            ecdsa=self.ecdsa.sign(text),
            ed25519=self.ed25519.sign(text),
            signing_address=self.ecdsa.address,
            ed25519_public_key=self.ed25519.public_key,
        )

    def __repr__(self) -> str:
        return f"CompletionSigner(address={self.ecdsa.address}, epoch={self.epoch})"
