"""A simulated TDX quoting enclave: byte-exact TDX v4 quotes under a local, SIMULATED root.

Used by `--tee simulated` and by tests. Every certificate it makes says SIMULATED in its
subject, and the verifier rejects its quotes unless told `--allow-simulated`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tee_inference.attestation.tdx_quote import (
    ATT_KEY_TYPE_ECDSA_P256,
    CERT_DATA_PCK_CHAIN,
    CERT_DATA_QE_REPORT,
    INTEL_QE_VENDOR_ID,
    QUOTE_VERSION_4,
    TEE_TYPE_TDX,
    QuoteFormatError,
)

# Fixed dates keep simulated certificates byte-identical for a given seed.
_SIM_NOT_BEFORE: Final = datetime(2025, 1, 1, tzinfo=UTC)
_SIM_NOT_AFTER: Final = datetime(2050, 1, 1, tzinfo=UTC)
_SIM_AUTH_DATA: Final = bytes(range(32))
_DEFAULT_TD_ATTRIBUTES: Final = bytes.fromhex("0000001000000000")  # SEPT_VE_DISABLE, not DEBUG
_DEFAULT_XFAM: Final = bytes.fromhex("e702060000000000")


def _derive_p256(seed: bytes, label: bytes) -> ec.EllipticCurvePrivateKey:
    # 512 bits reduced mod n-1 leaves a negligible bias; +1 keeps the scalar non-zero.
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    wide = int.from_bytes(hashlib.sha512(b"tee-inference simulated " + label + b"\0" + seed).digest(), "big")
    return ec.derive_private_key(wide % (n - 1) + 1, ec.SECP256R1())


def _sim_name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tee-inference SIMULATED (not Intel)"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])  # fmt: skip


def _sim_certificate(
    seed: bytes, subject: str, issuer: str, key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey, *, ca: bool,
) -> x509.Certificate:  # fmt: skip
    serial = int.from_bytes(hashlib.sha256(b"serial " + subject.encode() + seed).digest()[:16], "big") >> 1
    builder = (
        x509.CertificateBuilder()
        .subject_name(_sim_name(subject))
        .issuer_name(_sim_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial or 1)
        .not_valid_before(_SIM_NOT_BEFORE)
        .not_valid_after(_SIM_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(signer, hashes.SHA256(), ecdsa_deterministic=True)


def _sign_raw(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _require(name: str, value: bytes, size: int) -> bytes:
    if len(value) != size:
        raise QuoteFormatError(f"{name} must be {size} bytes, got {len(value)}")
    return bytes(value)


class SimulatedQuoteSigner:
    """Makes byte-exact TDX v4 quotes under a local, clearly SIMULATED PCK root → PCK leaf chain.

    With a ``seed`` every key, certificate and signature is deterministic (RFC 6979 signing), so
    tests and fixtures are reproducible; without one the keys are fresh for this process.
    """

    def __init__(self, seed: bytes | None = None) -> None:
        if seed is None:
            seed = os.urandom(32)
        if len(seed) != 32:
            raise ValueError(f"simulation seed must be 32 bytes, got {len(seed)}")
        root_key, self._pck_key = _derive_p256(seed, b"pck root"), _derive_p256(seed, b"pck leaf")
        self._attestation_key = _derive_p256(seed, b"attestation key")
        root_cn, leaf_cn = "SIMULATED TDX PCK Root CA", "SIMULATED TDX PCK Certificate"
        self._root = _sim_certificate(seed, root_cn, root_cn, root_key, root_key, ca=True)
        self._leaf = _sim_certificate(seed, leaf_cn, root_cn, self._pck_key, root_key, ca=False)
        self._qe_id = hashlib.sha256(b"SIMULATED QE id" + seed).digest()[:16]
        self._sig_tail = self._certification_data()

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._root

    @property
    def attestation_public_key(self) -> bytes:
        """The raw 64-byte x‖y attestation key that every quote from this signer carries."""
        point = self._attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return point[1:]

    def _certification_data(self) -> bytes:
        """Attestation key ‖ type-6 certification data: the same for every quote of this signer."""
        att_key = self.attestation_public_key
        qe_report = b"".join((
            hashlib.sha256(b"SIMULATED QE cpu_svn").digest()[:16], bytes(4), bytes(28),
            bytes.fromhex("11000000000000000700000000000000"),  # INIT|MODE64BIT, XFRM x87|SSE|AVX
            hashlib.sha256(b"SIMULATED QE mrenclave").digest(), bytes(32),
            hashlib.sha256(b"SIMULATED QE mrsigner").digest(), bytes(96),
            struct.pack("<HH", 2, 1), bytes(60),
            hashlib.sha256(att_key + _SIM_AUTH_DATA).digest(), bytes(32),
        ))  # fmt: skip
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self._leaf, self._root))
        qe_cert_data = b"".join((
            qe_report, _sign_raw(self._pck_key, qe_report),
            struct.pack("<H", len(_SIM_AUTH_DATA)), _SIM_AUTH_DATA,
            struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(pem)), pem,
        ))  # fmt: skip
        return att_key + struct.pack("<HI", CERT_DATA_QE_REPORT, len(qe_cert_data)) + qe_cert_data

    def quote(
        self,
        report_data: bytes,
        *,
        mrtd: bytes,
        rtmrs: Sequence[bytes],
        mrconfigid: bytes = bytes(48),
        mrowner: bytes = bytes(48),
        mrownerconfig: bytes = bytes(48),
        td_attributes: bytes = _DEFAULT_TD_ATTRIBUTES,
        xfam: bytes = _DEFAULT_XFAM,
        tee_tcb_svn: bytes = bytes(16),
        mrseam: bytes = bytes(48),
    ) -> bytes:
        """Return a signed TDX v4 quote (no trailing padding) over the given TD report fields."""
        if len(rtmrs) != 4:
            raise QuoteFormatError(f"rtmrs must hold 4 values (RTMR0–3), got {len(rtmrs)}")
        header = struct.pack("<HHIHH", QUOTE_VERSION_4, ATT_KEY_TYPE_ECDSA_P256, TEE_TYPE_TDX, 0, 0)
        header += INTEL_QE_VENDOR_ID + self._qe_id + bytes(4)
        body = b"".join((
            _require("tee_tcb_svn", tee_tcb_svn, 16), _require("mrseam", mrseam, 48), bytes(48),
            bytes(8), _require("td_attributes", td_attributes, 8), _require("xfam", xfam, 8),
            _require("mrtd", mrtd, 48), _require("mrconfigid", mrconfigid, 48),
            _require("mrowner", mrowner, 48), _require("mrownerconfig", mrownerconfig, 48),
            *(_require(f"rtmr{i}", rtmr, 48) for i, rtmr in enumerate(rtmrs)),
            _require("report_data", report_data, 64),
        ))  # fmt: skip
        signed = header + body
        sig_data = _sign_raw(self._attestation_key, signed) + self._sig_tail
        return signed + struct.pack("<I", len(sig_data)) + sig_data
