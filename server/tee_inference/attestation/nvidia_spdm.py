"""The binary layout of NVIDIA GPU attestation evidence (SPDM 1.1 GET_MEASUREMENTS + MEASUREMENTS).

A Hopper attestation report is the SPDM request the driver sent, followed by the GPU's
signed answer::

    request  (37 bytes)  version 0x11 | code 0xE0 | param1 | param2 | nonce[32] | slot id
    response             version 0x11 | code 0x60 | param1 | param2 | block count u8
                         | record length u24le | record | responder nonce[32]
                         | opaque length u16le | opaque data | signature[96]

The record is ``block count`` measurement blocks (index u8, spec u8, size u16le, then for
the DMTF spec: value type u8, value size u16le, value). The opaque data is a run of NVIDIA
TLV fields (type u16le, length u16le, value). The signature is ECDSA-P384 over SHA-384 of
everything before it, raw ``r || s``, made with the key of the device's leaf certificate.
Integers are little-endian, as everywhere in SPDM.

An NVSwitch (LS10) answers in the same layout, with 31 blocks and its own opaque fields: its
VBIOS version as ASCII text (``96.10.55.00.01``) rather than 8 bytes, no driver version, and
field 22 holding its own PDI (a GPU's field 22 lists the PDIs of the switches on its 18
NVLinks). Field 26 is the switch's 8 GPU PDIs followed by a port map.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tee_inference.exceptions import EvidenceError, FormatError

SPDM_VERSION_1_1: Final = 0x11
GET_MEASUREMENTS: Final = 0xE0
MEASUREMENTS: Final = 0x60
NONCE_SIZE: Final = 32
SIGNATURE_SIZE: Final = 96  # ECDSA-P384, raw r || s
DMTF_MEASUREMENT_SPEC: Final = 0x01

# NVIDIA's opaque-data field ids (the ones nvtrust names OPAQUE_FIELD_ID_*).
OPAQUE_FIELD_DRIVER_VERSION: Final = 3
OPAQUE_FIELD_GPU_INFO: Final = 4
OPAQUE_FIELD_VBIOS_VERSION: Final = 6
OPAQUE_FIELD_NVDEC0_STATUS: Final = 11
OPAQUE_FIELD_MSRSCNT: Final = 12
OPAQUE_FIELD_CPRINFO: Final = 13
OPAQUE_FIELD_BOARD_ID: Final = 14
OPAQUE_FIELD_CHIP_SKU: Final = 15
OPAQUE_FIELD_CHIP_SKU_MOD: Final = 16
OPAQUE_FIELD_PROJECT: Final = 17
OPAQUE_FIELD_PROJECT_SKU: Final = 18
OPAQUE_FIELD_PROJECT_SKU_MOD: Final = 19
OPAQUE_FIELD_FWID: Final = 20
OPAQUE_FIELD_PROTECTED_PCIE_STATUS: Final = 21
# Field 22 is SWITCH_PDI in a GPU's report and DEVICE_PDI in a switch's: same id, two meanings.
OPAQUE_FIELD_SWITCH_PDI: Final = 22
OPAQUE_FIELD_DEVICE_PDI: Final = 22
OPAQUE_FIELD_DISABLED_PORTS: Final = 23
OPAQUE_FIELD_SWITCH_POSITION_ID: Final = 24
OPAQUE_FIELD_SWITCH_LOCK_STATUS: Final = 25
OPAQUE_FIELD_SWITCH_GPU_PDIS: Final = 26
OPAQUE_FIELD_CHIP_INFO: Final = 35  # Blackwell: the chip name its CC driver RIM id carries

NVDEC_DISABLED: Final = 0x55  # NVDEC0_STATUS value when the video decoder is off (0xAA: on)

VBIOS_VERSION_SIZE: Final = 8


class GpuAttestationError(EvidenceError):
    """Base of every error raised while reading or checking NVIDIA GPU evidence."""


class GpuEvidenceFormatError(GpuAttestationError, FormatError):
    """The evidence bytes do not have the SPDM GET_MEASUREMENTS/MEASUREMENTS layout."""

    def __init__(self, field: str, offset: int, detail: str) -> None:
        super().__init__(f"GPU evidence: {field} at byte {offset}: {detail}")
        self.field = field
        self.offset = offset


class GpuEvidenceSignatureError(GpuAttestationError):
    """The evidence signature does not verify with the given certificate."""


class GpuNonceMismatchError(GpuAttestationError):
    """The evidence was requested with a different nonce than the one expected."""


@dataclass(frozen=True)
class MeasurementBlock:
    """One SPDM measurement block in the DMTF format."""

    index: int
    value_type: int  # DMTF measurement value type; bit 7 set means a raw bit stream, not a digest
    value: bytes
    specification: int = DMTF_MEASUREMENT_SPEC


@dataclass(frozen=True)
class OpaqueField:
    """One NVIDIA TLV field of the MEASUREMENTS opaque data."""

    field_id: int
    value: bytes


@dataclass(frozen=True)
class GpuEvidence:
    """A parsed attestation report; ``raw`` is kept so the signature can be checked over it."""

    raw: bytes
    spdm_version: int
    request_param1: int
    request_param2: int
    request_nonce: bytes
    slot_id: int
    response_param1: int
    response_param2: int
    measurements: tuple[MeasurementBlock, ...]
    response_nonce: bytes
    opaque_fields: tuple[OpaqueField, ...]
    driver_version: str | None  # None in an NVSwitch report, which has no driver
    vbios_version: str
    signature: bytes

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:-SIGNATURE_SIZE]

    def opaque_field(self, field_id: int) -> bytes | None:
        """The value of the first opaque field with this id, or None when it is absent."""
        for item in self.opaque_fields:
            if item.field_id == field_id:
                return item.value
        return None


class _Reader:
    """A cursor over the report that names the field and offset of whatever is missing."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int, field: str) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise GpuEvidenceFormatError(
                field, self.offset, f"needs {size} bytes, only {len(self.data) - self.offset} left"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u24(self, field: str) -> int:
        return int.from_bytes(self.take(3, field), "little")


def _expect(reader: _Reader, field: str, expected: int) -> int:
    offset = reader.offset
    value = reader.u8(field)
    if value != expected:
        raise GpuEvidenceFormatError(field, offset, f"expected 0x{expected:02x}, found 0x{value:02x}")
    return value


def parse_measurement_record(
    record: bytes, count: int, *, base_offset: int = 0
) -> tuple[MeasurementBlock, ...]:
    """Split a measurement record into exactly ``count`` DMTF blocks, consuming all of it."""
    reader = _Reader(record)
    blocks = []
    for number in range(count):
        name = f"measurement block {number}"
        start = reader.offset
        index = reader.u8(f"{name} index")
        spec = reader.u8(f"{name} specification")
        size = reader.u16(f"{name} size")
        body = reader.take(size, f"{name} measurement")
        if spec != DMTF_MEASUREMENT_SPEC:
            raise GpuEvidenceFormatError(
                f"{name} specification", base_offset + start + 1, f"0x{spec:02x} is not the DMTF format"
            )
        if size < 3 or int.from_bytes(body[1:3], "little") != size - 3:
            raise GpuEvidenceFormatError(
                f"{name} value size", base_offset + start + 5, f"does not match the block size {size}"
            )
        blocks.append(MeasurementBlock(index=index, value_type=body[0], value=body[3:], specification=spec))
    if reader.offset != len(record):
        raise GpuEvidenceFormatError(
            "measurement record",
            base_offset + reader.offset,
            f"{len(record) - reader.offset} bytes left after {count} blocks",
        )
    return tuple(blocks)


def parse_opaque_fields(opaque: bytes, *, base_offset: int = 0) -> tuple[OpaqueField, ...]:
    """Split NVIDIA opaque data into its TLV fields, consuming all of it."""
    reader = _Reader(opaque)
    fields = []
    while reader.offset < len(opaque):
        start = reader.offset
        try:
            field_id = reader.u16("opaque field type")
            size = reader.u16("opaque field length")
            value = reader.take(size, f"opaque field {field_id} value")
        except GpuEvidenceFormatError as exc:
            raise GpuEvidenceFormatError(exc.field, base_offset + start, "truncated TLV") from None
        fields.append(OpaqueField(field_id, value))
    return tuple(fields)


def format_vbios_version(value: bytes) -> str:
    """NVIDIA's dotted VBIOS version, e.g. bytes 00 9f 00 96 01 00 00 00 -> ``96.00.9F.00.01``.

    The first four bytes are a little-endian u32 printed as four hex pairs, the fifth byte
    is the OEM revision; the rest is padding.
    """
    if len(value) != VBIOS_VERSION_SIZE:
        raise ValueError(f"VBIOS version field must be {VBIOS_VERSION_SIZE} bytes, got {len(value)}")
    major = value[3::-1]
    return ".".join(f"{b:02X}" for b in (*major, value[4]))


def encode_vbios_version(version: str) -> bytes:
    """The inverse of :func:`format_vbios_version`."""
    parts = version.split(".")
    if len(parts) != 5 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"VBIOS version must look like 96.00.9F.00.01, got {version!r}")
    octets = bytes.fromhex("".join(parts))
    return octets[3::-1] + octets[4:5] + bytes(3)


def _text_field(fields: tuple[OpaqueField, ...], field_id: int, name: str, offset: int) -> bytes:
    for item in fields:
        if item.field_id == field_id:
            return item.value
    raise GpuEvidenceFormatError(f"opaque data {name} (field {field_id})", offset, "missing")


def _vbios_version(value: bytes) -> str:
    """A GPU's 8-byte binary VBIOS version, or an NVSwitch's ASCII one (``96.10.55.00.01``)."""
    if len(value) == VBIOS_VERSION_SIZE:
        return format_vbios_version(value)
    text = value.rstrip(b"\x00").decode("ascii")
    encode_vbios_version(text)  # the same dotted shape, or ValueError
    return text.upper()


def parse_gpu_evidence(raw: bytes) -> GpuEvidence:
    """Parse a raw attestation report; structure only, the signature is not checked here."""
    reader = _Reader(bytes(raw))
    version = _expect(reader, "request SPDM version", SPDM_VERSION_1_1)
    _expect(reader, "request code (GET_MEASUREMENTS)", GET_MEASUREMENTS)
    param1 = reader.u8("request param1")
    if not param1 & 0x01:
        # Without the "signature requested" bit the request carries no nonce and the answer no signature.
        raise GpuEvidenceFormatError("request param1", 2, "signature not requested: evidence is unsigned")
    param2 = reader.u8("request param2")
    request_nonce = reader.take(NONCE_SIZE, "request nonce")
    slot_id = reader.u8("request slot id")

    _expect(reader, "response SPDM version", version)
    _expect(reader, "response code (MEASUREMENTS)", MEASUREMENTS)
    response_param1 = reader.u8("response param1")
    response_param2 = reader.u8("response param2")
    count = reader.u8("number of blocks")
    record_length = reader.u24("measurement record length")
    record_offset = reader.offset
    record = reader.take(record_length, "measurement record")
    measurements = parse_measurement_record(record, count, base_offset=record_offset)
    response_nonce = reader.take(NONCE_SIZE, "response nonce")
    opaque_length = reader.u16("opaque data length")
    opaque_offset = reader.offset
    opaque = reader.take(opaque_length, "opaque data")
    fields = parse_opaque_fields(opaque, base_offset=opaque_offset)
    signature_offset = reader.offset
    signature = reader.data[signature_offset:]
    if len(signature) != SIGNATURE_SIZE:
        raise GpuEvidenceFormatError(
            "signature",
            signature_offset,
            f"expected {SIGNATURE_SIZE} bytes to the end, found {len(signature)}",
        )

    # A switch has no driver; which kind of device this is, the verifier learns from the chain.
    driver_raw = next((f.value for f in fields if f.field_id == OPAQUE_FIELD_DRIVER_VERSION), None)
    vbios_raw = _text_field(fields, OPAQUE_FIELD_VBIOS_VERSION, "VBIOS version", opaque_offset)
    try:
        driver_version = None if driver_raw is None else driver_raw.rstrip(b"\x00").decode("ascii")
        vbios_version = _vbios_version(vbios_raw)
    except ValueError as exc:
        raise GpuEvidenceFormatError("opaque data versions", opaque_offset, str(exc)) from None

    return GpuEvidence(
        raw=reader.data,
        spdm_version=version,
        request_param1=param1,
        request_param2=param2,
        request_nonce=request_nonce,
        slot_id=slot_id,
        response_param1=response_param1,
        response_param2=response_param2,
        measurements=measurements,
        response_nonce=response_nonce,
        opaque_fields=fields,
        driver_version=driver_version,
        vbios_version=vbios_version,
        signature=signature,
    )


def verify_evidence_signature(evidence: GpuEvidence, leaf: x509.Certificate) -> None:
    """Check the report's ECDSA-P384/SHA-384 signature with the leaf certificate's key."""
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise GpuEvidenceSignatureError(
            f"leaf certificate {leaf.subject.rfc4514_string()} does not hold a P-384 key"
        )
    half = SIGNATURE_SIZE // 2
    r = int.from_bytes(evidence.signature[:half], "big")
    s = int.from_bytes(evidence.signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), evidence.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise GpuEvidenceSignatureError(
            "GPU evidence signature does not verify with the key of "
            f"{leaf.subject.rfc4514_string()}: the report was altered or comes from another device"
        ) from None


def verify_evidence_nonce(evidence: GpuEvidence, expected: bytes) -> None:
    """Check that the evidence answers a request made with ``expected`` (the freshness check)."""
    if evidence.request_nonce != expected:
        raise GpuNonceMismatchError(
            f"GPU evidence was requested with nonce {evidence.request_nonce.hex()}, expected {expected.hex()}"
        )


# Encoding, used by the simulator; the inverse of the parsing above.


def encode_measurement_request(nonce: bytes, *, param2: int = 0xFF, slot_id: int = 0) -> bytes:
    """A signed GET_MEASUREMENTS request for all measurements (param2 0xFF) with this nonce."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return bytes((SPDM_VERSION_1_1, GET_MEASUREMENTS, 0x01, param2)) + nonce + bytes((slot_id,))


def encode_measurement_block(block: MeasurementBlock) -> bytes:
    body = struct.pack("<BH", block.value_type, len(block.value)) + block.value
    return struct.pack("<BBH", block.index, block.specification, len(body)) + body


def encode_opaque_fields(fields: tuple[OpaqueField, ...]) -> bytes:
    return b"".join(struct.pack("<HH", f.field_id, len(f.value)) + f.value for f in fields)


def encode_measurements_response(
    blocks: tuple[MeasurementBlock, ...], response_nonce: bytes, opaque: bytes
) -> bytes:
    """A MEASUREMENTS response up to (not including) its signature."""
    if len(response_nonce) != NONCE_SIZE:
        raise ValueError(f"response nonce must be {NONCE_SIZE} bytes, got {len(response_nonce)}")
    record = b"".join(encode_measurement_block(b) for b in blocks)
    header = bytes((SPDM_VERSION_1_1, MEASUREMENTS, 0, 0, len(blocks))) + len(record).to_bytes(3, "little")
    return header + record + response_nonce + struct.pack("<H", len(opaque)) + opaque
