"""Simulated NVIDIA devices: byte-exact SPDM evidence under local P-384 chains named SIMULATED.

``SimulatedGpu`` mirrors a Hopper board: a five-certificate chain (root first: Device Identity
CA, GH100 Identity, Provisioner ICA, GSP BROM, GSP FMC leaf with the FWID extension), 64
measurement blocks and the same opaque fields in the same order. ``SimulatedSwitch`` mirrors an
LS10 NVSwitch: the ``LS_10 … FSP`` chain, 31 blocks, its own PDI and the PDIs of the GPUs it
serves. ``simulated_hgx_board`` wires 8 GPUs and 4 switches the way an HGX board is. Every name
says SIMULATED, so a verifier can only accept these when told to.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tee_inference.attestation.nvidia_certs import encode_fwid_extension
from tee_inference.attestation.nvidia_devices import BLACKWELL, HOPPER, LS10
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload
from tee_inference.attestation.nvidia_spdm import (
    NONCE_SIZE,
    OPAQUE_FIELD_BOARD_ID,
    OPAQUE_FIELD_CHIP_SKU,
    OPAQUE_FIELD_CHIP_SKU_MOD,
    OPAQUE_FIELD_CPRINFO,
    OPAQUE_FIELD_DEVICE_PDI,
    OPAQUE_FIELD_DISABLED_PORTS,
    OPAQUE_FIELD_DRIVER_VERSION,
    OPAQUE_FIELD_FWID,
    OPAQUE_FIELD_GPU_INFO,
    OPAQUE_FIELD_MSRSCNT,
    OPAQUE_FIELD_NVDEC0_STATUS,
    OPAQUE_FIELD_PROJECT,
    OPAQUE_FIELD_PROJECT_SKU,
    OPAQUE_FIELD_PROJECT_SKU_MOD,
    OPAQUE_FIELD_PROTECTED_PCIE_STATUS,
    OPAQUE_FIELD_SWITCH_GPU_PDIS,
    OPAQUE_FIELD_SWITCH_LOCK_STATUS,
    OPAQUE_FIELD_SWITCH_PDI,
    OPAQUE_FIELD_SWITCH_POSITION_ID,
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
SIM_NOT_BEFORE: Final = datetime(2024, 1, 1, tzinfo=UTC)
_SIM_NOT_AFTER: Final = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)  # as NVIDIA's device certificates
_SIM_DMTF_MUTABLE_FIRMWARE: Final = 0x01
_NVLINKS: Final = 18  # a Hopper GPU reports one switch PDI per NVLink


def derive_p384_key(secret: bytes, label: str) -> ec.EllipticCurvePrivateKey:
    """A P-384 key fixed by ``secret`` and ``label`` (the simulators' only source of keys)."""
    digest = hmac.new(secret, label.encode("ascii"), hashlib.sha512).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (_P384_ORDER - 1) + 1, ec.SECP384R1())


def simulated_name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SIMULATED (not NVIDIA)"),
    ])  # fmt: skip


@dataclass(frozen=True)
class _SimCert:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


class _SimulatedDevice:
    """The chain and the signing shared by the simulated GPU and NVSwitch."""

    _subjects: tuple[str, ...] = ()  # root first
    _block_count = 0
    arch = HOPPER

    def __init__(self, seed: bytes | None) -> None:
        if seed is not None and len(seed) != 32:
            raise ValueError(f"seed must be 32 bytes, got {len(seed)}")
        self._secret = bytes(seed) if seed is not None else os.urandom(32)
        self._chain = self._build_chain()

    def _derive(self, label: str, size: int = 48) -> bytes:
        return hmac.new(self._secret, label.encode("ascii"), hashlib.sha512).digest()[:size]

    def _build_chain(self) -> tuple[_SimCert, ...]:
        made: list[_SimCert] = []
        for depth, cn in enumerate(self._subjects):
            key = derive_p384_key(self._secret, f"key {depth}")
            issuer = made[-1] if made else None
            builder = (
                x509.CertificateBuilder()
                .subject_name(simulated_name(cn))
                .issuer_name(issuer.certificate.subject if issuer else simulated_name(cn))
                .public_key(key.public_key())
                .serial_number(int.from_bytes(self._derive(f"serial {depth}", 19), "big") | 1)
                .not_valid_before(SIM_NOT_BEFORE)
                .not_valid_after(_SIM_NOT_AFTER)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(
                        (issuer.key if issuer else key).public_key()
                    ),
                    critical=False,
                )
            )
            if depth == len(self._subjects) - 1:  # the leaf
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

    @property
    def private_keys(self) -> tuple[ec.EllipticCurvePrivateKey, ...]:
        """The chain's keys, leaf first: a test's fake OCSP responder signs with the issuers'."""
        return tuple(c.key for c in self._chain)

    def certificate_chain_pem(self) -> bytes:
        """PEM, leaf first, root last, as a real device's chain."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.certificates)

    def _tag(self) -> bytes:
        raise NotImplementedError

    def _opaque(self) -> bytes:
        raise NotImplementedError

    def _overrides(self) -> Mapping[int, bytes]:
        return {}

    def measurements(self) -> tuple[MeasurementBlock, ...]:
        """Deterministic digests that depend only on the block index and the versions."""
        tag, overrides = self._tag(), self._overrides()
        return tuple(
            MeasurementBlock(
                index,
                _SIM_DMTF_MUTABLE_FIRMWARE,
                overrides.get(index) or hashlib.sha384(tag + bytes((index,))).digest(),
            )
            for index in range(1, self._block_count + 1)
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

    def entry(self, nonce: bytes) -> GpuEvidenceEntry:
        return GpuEvidenceEntry(self.evidence(nonce), self.certificate_chain_pem(), arch=self.arch)

    def payload(self, nonce: bytes) -> NvidiaPayload:
        """The NRAS v3 payload for this one device."""
        return NvidiaPayload(nonce=bytes(nonce), entries=(self.entry(nonce),), arch=self.arch)


class SimulatedGpu(_SimulatedDevice):
    """A stand-in GPU that answers with byte-exact SPDM evidence under a SIMULATED P-384 chain.

    With a 32-byte ``seed`` the keys, certificates and evidence are deterministic; without
    one they are fresh for each instance. ``chip`` names the part (``GB100`` makes a Blackwell);
    ``project``, ``project_sku`` and ``chip_sku`` make up its VBIOS RIM id; ``measurements``
    replaces blocks by index (to answer as a RIM says); ``switch_pdis`` are the PDIs of the
    switches on its NVLinks, as they read in the report.
    """

    _block_count = 64  # as many as a Hopper report

    def __init__(
        self,
        seed: bytes | None = None,
        *,
        driver_version: str = "550.90.07",
        vbios_version: str = "96.00.9F.00.01",
        chip: str = "GH100",
        project: str = "SIM",
        project_sku: str = "SIM",
        chip_sku: str = "SIM",
        measurements: Mapping[int, bytes] | None = None,
        switch_pdis: Sequence[bytes] = (),
        nvdec_status: int = 0x55,
    ) -> None:
        # Fail here, not at the first evidence() call.
        encode_vbios_version(vbios_version)
        driver_version.encode("ascii")
        if len(switch_pdis) > _NVLINKS or any(len(p) != 8 for p in switch_pdis):
            raise ValueError(f"switch_pdis: at most {_NVLINKS} PDIs of 8 bytes")
        self._driver_version, self._vbios_version = driver_version, vbios_version
        self._project, self._project_sku, self._chip_sku = project, project_sku, chip_sku
        self._replaced = dict(measurements or {})
        self._switch_pdis = tuple(switch_pdis)
        self._nvdec = nvdec_status
        self.arch = BLACKWELL if chip.startswith("GB") else HOPPER
        self._subjects = (  # root first, mirroring the five-certificate Hopper chain
            "SIMULATED NVIDIA Device Identity CA",
            f"SIMULATED NVIDIA {chip} Identity",
            f"SIMULATED NVIDIA {chip} Provisioner ICA 1",
            f"SIMULATED {chip} A01 GSP BROM",
            f"SIMULATED {chip} A01 GSP FMC LF",
        )
        super().__init__(seed)

    @property
    def driver_version(self) -> str:
        return self._driver_version

    @property
    def vbios_version(self) -> str:
        return self._vbios_version

    def _tag(self) -> bytes:
        return f"SIMULATED GPU measurement {self.driver_version} {self.vbios_version} ".encode("ascii")

    def _overrides(self) -> Mapping[int, bytes]:
        return self._replaced

    def _opaque(self) -> bytes:
        # Same fields, in the same order, as a Hopper report; values other than the
        # versions, identifiers and FWID are fixed placeholders.
        fields = [
            OpaqueField(OPAQUE_FIELD_VBIOS_VERSION, encode_vbios_version(self.vbios_version)),
            OpaqueField(OPAQUE_FIELD_BOARD_ID, bytes(4)),
            OpaqueField(OPAQUE_FIELD_CHIP_SKU, self._chip_sku.encode("ascii").ljust(9, b"\x00")),
            OpaqueField(OPAQUE_FIELD_CHIP_SKU_MOD, b"0".ljust(5, b"\x00")),
            OpaqueField(OPAQUE_FIELD_PROJECT, self._project.encode("ascii").ljust(5, b"\x00")),
            OpaqueField(OPAQUE_FIELD_PROJECT_SKU, self._project_sku.encode("ascii").ljust(5, b"\x00")),
            OpaqueField(OPAQUE_FIELD_PROJECT_SKU_MOD, bytes(2)),
            OpaqueField(OPAQUE_FIELD_DRIVER_VERSION, self.driver_version.encode("ascii") + b"\x00"),
            OpaqueField(OPAQUE_FIELD_GPU_INFO, bytes(8)),
            OpaqueField(OPAQUE_FIELD_MSRSCNT, bytes(256)),
            OpaqueField(OPAQUE_FIELD_CPRINFO, bytes(4)),
            OpaqueField(OPAQUE_FIELD_NVDEC0_STATUS, bytes((self._nvdec,))),
            OpaqueField(OPAQUE_FIELD_FWID, self.fwid),
            OpaqueField(OPAQUE_FIELD_PROTECTED_PCIE_STATUS, b"\x55"),
        ]
        if self._switch_pdis:
            pdis = b"".join(self._switch_pdis).ljust(_NVLINKS * 8, b"\x00")
            fields.append(OpaqueField(OPAQUE_FIELD_SWITCH_PDI, pdis))
        return encode_opaque_fields(tuple(fields))


class SimulatedSwitch(_SimulatedDevice):
    """A stand-in LS10 NVSwitch: its own ``pdi`` and the 8 ``gpu_pdis`` it serves, as reported."""

    _block_count = 31  # as many as an LS10 report
    arch = LS10

    def __init__(
        self,
        seed: bytes | None = None,
        *,
        pdi: bytes = bytes(range(1, 9)),
        gpu_pdis: Sequence[bytes] = (),
        vbios_version: str = "96.10.55.00.01",
    ) -> None:
        encode_vbios_version(vbios_version)
        if len(pdi) != 8 or len(gpu_pdis) > 8 or any(len(p) != 8 for p in gpu_pdis):
            raise ValueError("pdi and each of at most 8 gpu_pdis must be 8 bytes")
        self.pdi, self._gpu_pdis, self._vbios_version = bytes(pdi), tuple(gpu_pdis), vbios_version
        self._subjects = (
            "SIMULATED NVIDIA Device Identity CA",
            "SIMULATED NVIDIA GH100 Identity",
            "SIMULATED NVIDIA LS_10 Provisioner ICA 1",
            "SIMULATED LS_10 A01 FSP BROM",
            "SIMULATED LS_10 A01 FSP FMC LF",
        )
        super().__init__(seed)

    @property
    def vbios_version(self) -> str:
        return self._vbios_version

    def _tag(self) -> bytes:
        return f"SIMULATED NVSwitch measurement {self.vbios_version} ".encode("ascii")

    def _opaque(self) -> bytes:
        # The fields of a real LS10 report, in its order; the port map and counts are placeholders.
        gpu_pdis = b"".join(self._gpu_pdis).ljust(64, b"\x00") + bytes(64)
        return encode_opaque_fields((
            OpaqueField(OPAQUE_FIELD_VBIOS_VERSION, self.vbios_version.encode("ascii")),
            OpaqueField(OPAQUE_FIELD_DEVICE_PDI, self.pdi),
            OpaqueField(OPAQUE_FIELD_MSRSCNT, bytes(104)),
            OpaqueField(OPAQUE_FIELD_SWITCH_GPU_PDIS, gpu_pdis),
            OpaqueField(OPAQUE_FIELD_DISABLED_PORTS, bytes(2)),
            OpaqueField(OPAQUE_FIELD_SWITCH_POSITION_ID, bytes(2)),
            OpaqueField(OPAQUE_FIELD_SWITCH_LOCK_STATUS, b"\x01\x00"),
        ))  # fmt: skip


def simulated_hgx_board(seed: bytes) -> tuple[tuple[SimulatedGpu, ...], tuple[SimulatedSwitch, ...]]:
    """8 GPUs and 4 NVSwitches wired as on an HGX board: every GPU reaches every switch."""
    pdi = [hashlib.sha256(seed + b"switch %d" % n).digest()[:8] for n in range(4)]
    gpu_pdis = [hashlib.sha256(seed + b"gpu %d" % n).digest()[:8] for n in range(8)]
    # A GPU reports each switch PDI little-endian; a switch reports its own as is.
    links = [p[::-1] for p in pdi for _ in range(4)] + [bytes(8), bytes(8)]  # 2 links unused
    gpus = tuple(
        SimulatedGpu(hashlib.sha256(seed + b"gpu key %d" % n).digest(), switch_pdis=links) for n in range(8)
    )
    switches = tuple(
        SimulatedSwitch(hashlib.sha256(seed + b"switch key %d" % n).digest(), pdi=pdi[n], gpu_pdis=gpu_pdis)
        for n in range(4)
    )
    return gpus, switches
