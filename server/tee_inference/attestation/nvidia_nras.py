"""NVIDIA NRAS replies: decoding the EAT tokens and checking their ES384 signatures.

NRAS answers ``[["JWT", overall], {"GPU-0": token, ...}]``. The overall token's ``submods``
claim binds each per-GPU token by digest: ``submods["GPU-n"] = ["DIGEST", ["SHA-256",
sha256(token string)]]``. Decoding checks that binding; whether the tokens were issued by
NVIDIA is a separate, online question (:func:`verify_nras_jwt` with NVIDIA's JWKS).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tee_inference.attestation.nvidia_spdm import GpuAttestationError
from tee_inference.exceptions import FormatError

NRAS_ALGORITHM: Final = "ES384"
_ES384_SIGNATURE_SIZE: Final = 96
_P384_COORDINATE_SIZE: Final = 48


class NrasResponseError(GpuAttestationError, FormatError):
    """An NRAS reply is malformed or its per-GPU tokens are not the ones the overall token names."""


class NrasSignatureError(GpuAttestationError):
    """An NRAS token is not signed by a key of the given JWKS, or is outside its validity window."""


@dataclass(frozen=True)
class Jwt:
    """A decoded, not yet verified, compact JWS."""

    token: str
    header: Mapping[str, Any]
    claims: Mapping[str, Any]


@dataclass(frozen=True)
class NrasGpuResult:
    """One GPU's attestation token from NRAS."""

    name: str
    jwt: Jwt

    @property
    def measres(self) -> str | None:
        return self.jwt.claims.get("measres")

    @property
    def driver_version(self) -> str | None:
        return self.jwt.claims.get("x-nvidia-gpu-driver-version")

    @property
    def vbios_version(self) -> str | None:
        return self.jwt.claims.get("x-nvidia-gpu-vbios-version")

    @property
    def nonce_match(self) -> bool:
        return self.jwt.claims.get("x-nvidia-gpu-attestation-report-nonce-match") is True


@dataclass(frozen=True)
class NrasResult:
    """A decoded NRAS reply whose submods digests hold; signatures not checked."""

    overall: Jwt
    gpus: tuple[NrasGpuResult, ...]
    eat_nonce: str

    @property
    def overall_result(self) -> bool:
        return self.overall.claims.get("x-nvidia-overall-att-result") is True

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every token in the reply, for signature checks."""
        return (self.overall.token, *(gpu.jwt.token for gpu in self.gpus))

    def gpu(self, name: str) -> NrasGpuResult:
        for gpu in self.gpus:
            if gpu.name == name:
                return gpu
        raise KeyError(name)


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def decode_jwt(token: str) -> Jwt:
    """Split and decode a compact JWS without verifying it."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise NrasResponseError("a JWT must be a string of three dot-separated parts")
    try:
        header = json.loads(_b64url(parts[0]))
        claims = json.loads(_b64url(parts[1]))
    except (binascii.Error, ValueError) as exc:
        raise NrasResponseError(f"JWT header or claims are not base64url JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise NrasResponseError("JWT header and claims must be JSON objects")
    return Jwt(token=token, header=header, claims=claims)


def _submod_digest(submods: Mapping[str, Any], name: str) -> str:
    entry = submods.get(name)
    try:
        kind, (algorithm, digest) = entry  # type: ignore[misc]
    except (TypeError, ValueError):
        raise NrasResponseError(f"overall token has no DIGEST submod for {name}") from None
    if kind != "DIGEST" or algorithm != "SHA-256" or not isinstance(digest, str):
        raise NrasResponseError(f"submod {name} is {entry!r}, expected ['DIGEST', ['SHA-256', hex]]")
    return digest


def parse_nras_response(obj: object) -> NrasResult:
    """Decode an NRAS reply (parsed JSON or its text) and check the submods digests.

    Raises :class:`NrasResponseError` when a per-GPU token is missing, extra or altered.
    """
    if isinstance(obj, str | bytes):
        try:
            obj = json.loads(obj)
        except ValueError as exc:
            raise NrasResponseError(f"NRAS reply is not JSON: {exc}") from None
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[1], dict)):
        raise NrasResponseError('NRAS reply must be [["JWT", overall], {"GPU-n": token, ...}]')
    head, per_gpu = obj
    if not (isinstance(head, list) and len(head) == 2 and head[0] == "JWT"):
        raise NrasResponseError('NRAS reply must start with ["JWT", overall token]')
    overall = decode_jwt(head[1])
    submods = overall.claims.get("submods")
    if not isinstance(submods, dict):
        raise NrasResponseError("overall token has no submods claim")
    if set(submods) != set(per_gpu):
        raise NrasResponseError(
            f"overall token names {sorted(submods)} but the reply carries {sorted(per_gpu)}"
        )
    eat_nonce = overall.claims.get("eat_nonce")
    if not isinstance(eat_nonce, str):
        raise NrasResponseError("overall token has no eat_nonce")
    gpus = []
    for name in sorted(per_gpu):
        token = per_gpu[name]
        if not isinstance(token, str):
            raise NrasResponseError(f"{name}: token is not a string")
        actual = hashlib.sha256(token.encode("utf-8")).hexdigest()
        if not hmac.compare_digest(actual, _submod_digest(submods, name).lower()):
            raise NrasResponseError(
                f"{name}: sha256 of its token is {actual}, but the overall token's submods names "
                f"{_submod_digest(submods, name)}; the per-GPU token was altered or swapped"
            )
        jwt = decode_jwt(token)
        if jwt.claims.get("eat_nonce") != eat_nonce:
            raise NrasResponseError(f"{name}: eat_nonce differs from the overall token's {eat_nonce}")
        gpus.append(NrasGpuResult(name=name, jwt=jwt))
    return NrasResult(overall=overall, gpus=tuple(gpus), eat_nonce=eat_nonce)


def _jwk_public_key(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    if jwk.get("kty") == "EC" and jwk.get("crv") == "P-384" and "x" in jwk and "y" in jwk:
        x, y = _b64url(jwk["x"]), _b64url(jwk["y"])
        if len(x) != _P384_COORDINATE_SIZE or len(y) != _P384_COORDINATE_SIZE:
            raise NrasSignatureError(f"JWK {jwk.get('kid')}: P-384 coordinates must be 48 bytes")
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP384R1()
        )
        return numbers.public_key()
    chain = jwk.get("x5c")
    if isinstance(chain, list) and chain:
        key = x509.load_der_x509_certificate(base64.b64decode(chain[0])).public_key()
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1):
            return key
    raise NrasSignatureError(f"JWK {jwk.get('kid')} is not a P-384 EC key")


def verify_nras_jwt(token: str, jwks: Mapping[str, Any], *, at: datetime | None = None) -> dict[str, Any]:
    """Verify an ES384 token against a JWKS (``{"keys": [...]}``) and return its claims.

    The key is chosen by the token's ``kid``. With ``at`` (timezone-aware), ``nbf`` and
    ``exp`` are checked too.
    """
    jwt = decode_jwt(token)
    if jwt.header.get("alg") != NRAS_ALGORITHM:
        raise NrasSignatureError(f"token algorithm is {jwt.header.get('alg')!r}, expected {NRAS_ALGORITHM}")
    kid = jwt.header.get("kid")
    keys = [k for k in jwks.get("keys", []) if isinstance(k, Mapping) and k.get("kid") == kid]
    if not keys:
        raise NrasSignatureError(f"no key with kid {kid!r} in the JWKS; fetch NVIDIA's current JWKS")
    signing_input, _, signature_b64 = token.rpartition(".")
    try:
        signature = _b64url(signature_b64)
    except (binascii.Error, ValueError):
        raise NrasSignatureError("token signature is not base64url") from None
    if len(signature) != _ES384_SIGNATURE_SIZE:
        raise NrasSignatureError(f"ES384 signature must be 96 bytes, got {len(signature)}")
    der = encode_dss_signature(int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big"))
    try:
        _jwk_public_key(keys[0]).verify(der, signing_input.encode("ascii"), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise NrasSignatureError(f"token signature does not verify with JWKS key {kid!r}") from None
    if at is not None:
        if at.tzinfo is None:
            raise ValueError("'at' must be timezone-aware")
        now = at.timestamp()
        nbf, exp = jwt.claims.get("nbf"), jwt.claims.get("exp")
        if isinstance(nbf, int | float) and now < nbf:
            raise NrasSignatureError(f"token not valid before {nbf} (checked at {int(now)})")
        if isinstance(exp, int | float) and now >= exp:
            raise NrasSignatureError(f"token expired at {exp} (checked at {int(now)})")
    return dict(jwt.claims)
