"""A simulated NVIDIA GPU: byte-exact SPDM evidence under a local P-384 chain named SIMULATED.

It mirrors a Hopper board: a five-certificate chain (root first: Device Identity CA, GH100
Identity, Provisioner ICA, GSP BROM, GSP FMC leaf with the FWID extension), 64 measurement blocks
and the same opaque fields in the same order. Every name says SIMULATED, so a verifier can only
accept it when told to.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tee_inference.attestation.nvidia_certs import encode_fwid_extension
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload
from tee_inference.attestation.nvidia_spdm import (
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
    MeasurementBlock,
    OpaqueField,
    encode_measurement_request,
    encode_measurements_response,
    encode_opaque_fields,
    encode_vbios_version,
)

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
