"""Which NVIDIA device a piece of evidence comes from: its architecture, identity and NVLink peers.

Architecture. The report's ``arch`` string is unsigned; the device chain is signed. The chip
is the first word of the leaf's common name (``GH100 A01 GSP FMC LF``, ``GB100 A01 GSP FMC LF``,
``LS_10 A01 FSP FMC LF``), which maps to NRAS's names ``HOPPER``, ``BLACKWELL`` and ``LS10``.

Identity. NVIDIA's per-device claim ``ueid`` is the leaf certificate's serial number, in
decimal. The leaf key is derived with the FMC firmware measurement, so it can change with a
firmware update; the key of chain index 1 (``… BROM``) is the device's firmware-independent
DICE identity. Two entries that share either are one device reported twice.

Topology (NVIDIA's PPCIE verifier and Tinfoil's boot check, for HGX H100/H200: 8 GPUs, 4
NVSwitches). A GPU's field 22 lists, per NVLink, the PDI of the switch at its far end, each 8
bytes little-endian; read byte-reversed and without the zero entries of disabled links, every
GPU must see the same 4 switches. A switch's field 22 is its own PDI (as is, not reversed),
which must be one of those 4 and reported by one switch only; the first 64 bytes of its field
26 are the PDIs of the 8 GPUs it serves, the same 8 for every switch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tee_inference.attestation.nvidia_spdm import (
    OPAQUE_FIELD_DEVICE_PDI,
    OPAQUE_FIELD_SWITCH_GPU_PDIS,
    OPAQUE_FIELD_SWITCH_PDI,
    GpuEvidence,
)

HOPPER: Final = "HOPPER"
BLACKWELL: Final = "BLACKWELL"
LS10: Final = "LS10"
GPU_ARCHES: Final = frozenset({HOPPER, BLACKWELL})
SWITCH_ARCHES: Final = frozenset({LS10})
KNOWN_ARCHES: Final = GPU_ARCHES | SWITCH_ARCHES
# Chip names in device chains, by prefix. Blackwell parts are GB100, GB102, GB202, ….
_CHIP_ARCH: Final = (("GH1", HOPPER), ("GB1", BLACKWELL), ("GB2", BLACKWELL), ("LS_10", LS10))
_SIMULATED_PREFIX: Final = "SIMULATED "
PDI_SIZE: Final = 8
HGX_GPUS: Final = 8
HGX_SWITCHES: Final = 4


def _common_name(cert: x509.Certificate) -> str:
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return ""
    return str(names[0].value) if names else ""


def chain_chip(certs: Sequence[x509.Certificate]) -> str | None:
    """The chip the leaf names (``GH100``, ``LS_10``), with a simulator's prefix removed."""
    if not certs:
        return None
    words = _common_name(certs[0]).removeprefix(_SIMULATED_PREFIX).split()
    return words[0] if words else None


def chain_arch(certs: Sequence[x509.Certificate]) -> str | None:
    """The NRAS architecture name the signed chain implies, or None for a chip we do not know."""
    chip = chain_chip(certs)
    if chip is None:
        return None
    return next((arch for prefix, arch in _CHIP_ARCH if chip.startswith(prefix)), None)


@dataclass(frozen=True)
class DeviceIdentity:
    """One physical device: NVIDIA's ``ueid`` and the SHA-256 of its BROM identity key."""

    ueid: str  # decimal serial number of the leaf certificate, as NVIDIA's claim prints it
    identity_key_sha256: str | None  # of the SubjectPublicKeyInfo of chain index 1; None if absent

    def __str__(self) -> str:
        key = self.identity_key_sha256 or "none"
        return f"ueid {self.ueid}, identity key sha256 {key}"

    def shares_with(self, other: DeviceIdentity) -> bool:
        same_key = self.identity_key_sha256 is not None and (
            self.identity_key_sha256 == other.identity_key_sha256
        )
        return self.ueid == other.ueid or same_key


def device_identity(certs: Sequence[x509.Certificate]) -> DeviceIdentity:
    """The identity a chain (leaf first) names; ValueError for an empty chain."""
    if not certs:
        raise ValueError("an empty chain names no device")
    key = None
    if len(certs) > 1:
        spki = (
            certs[1]
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        key = hashlib.sha256(spki).hexdigest()
    return DeviceIdentity(str(certs[0].serial_number), key)


def duplicate_devices(identities: Iterable[tuple[str, DeviceIdentity]]) -> list[str]:
    """One line per pair of labelled identities that name the same device (by ueid or key)."""
    seen: list[tuple[str, DeviceIdentity]] = []
    problems = []
    for label, identity in identities:
        for first, other in seen:
            if identity.shares_with(other):
                same = (
                    f"ueid {identity.ueid}"
                    if identity.ueid == other.ueid
                    else f"identity key sha256 {identity.identity_key_sha256}"
                )
                problems.append(f"{label} is the same device as {first} ({same})")
                break
        else:
            seen.append((label, identity))
    return problems


def _pdis(raw: bytes, *, reverse: bool) -> list[str]:
    chunks = [raw[i : i + PDI_SIZE] for i in range(0, len(raw) - len(raw) % PDI_SIZE, PDI_SIZE)]
    return [(chunk[::-1] if reverse else chunk).hex() for chunk in chunks]


def switches_seen_by_gpu(evidence: GpuEvidence) -> frozenset[str] | None:
    """The distinct switch PDIs on a GPU's NVLinks (byte-reversed, disabled links dropped)."""
    raw = evidence.opaque_field(OPAQUE_FIELD_SWITCH_PDI)
    if raw is None:
        return None
    return frozenset(p for p in _pdis(raw, reverse=True) if p != "00" * PDI_SIZE)


def switch_pdi(evidence: GpuEvidence) -> str | None:
    raw = evidence.opaque_field(OPAQUE_FIELD_DEVICE_PDI)
    return raw.hex() if raw is not None and len(raw) == PDI_SIZE else None


def gpus_seen_by_switch(evidence: GpuEvidence) -> frozenset[str] | None:
    """The distinct GPU PDIs among the first 8 of a switch's field 26 (the rest is a port map)."""
    raw = evidence.opaque_field(OPAQUE_FIELD_SWITCH_GPU_PDIS)
    if raw is None or len(raw) < HGX_GPUS * PDI_SIZE:
        return None
    pdis = _pdis(raw[: HGX_GPUS * PDI_SIZE], reverse=False)
    return frozenset(p for p in pdis if p != "00" * PDI_SIZE)


def topology_problems(
    gpus: Sequence[tuple[str, GpuEvidence]], switches: Sequence[tuple[str, GpuEvidence]]
) -> list[str]:
    """Why ``gpus`` and ``switches`` (labelled) are not one HGX board of 8 GPUs and 4 NVSwitches."""
    problems = []
    if len(gpus) != HGX_GPUS or len(switches) != HGX_SWITCHES:
        problems.append(
            f"{len(gpus)} GPU(s) and {len(switches)} NVSwitch(es); "
            f"an HGX board is {HGX_GPUS} GPUs and {HGX_SWITCHES} NVSwitches"
        )
    expected: frozenset[str] | None = None
    for label, evidence in gpus:
        seen = switches_seen_by_gpu(evidence)
        if seen is None:
            problems.append(f"{label}: no switch PDIs (opaque field 22)")
        elif len(seen) != HGX_SWITCHES:
            problems.append(f"{label} sees {len(seen)} distinct switches, not {HGX_SWITCHES}")
        elif expected is None:
            expected = seen
        elif seen != expected:
            problems.append(f"{label} sees other switches than {gpus[0][0]}")
    reported: dict[str, str] = {}
    first_gpus: tuple[str, frozenset[str]] | None = None
    for label, evidence in switches:
        pdi = switch_pdi(evidence)
        if pdi is None:
            problems.append(f"{label}: no 8-byte device PDI (opaque field 22)")
        elif expected is not None and pdi not in expected:
            problems.append(f"{label}: PDI {pdi} is none of the switches the GPUs see")
        elif pdi in reported:
            problems.append(f"{label}: PDI {pdi} is already reported by {reported[pdi]}")
        else:
            reported[pdi] = label
        served = gpus_seen_by_switch(evidence)
        if served is None:
            problems.append(f"{label}: no GPU PDIs (opaque field 26)")
        elif len(served) != HGX_GPUS:
            problems.append(f"{label} serves {len(served)} distinct GPUs, not {HGX_GPUS}")
        elif first_gpus is None:
            first_gpus = (label, served)
        elif served != first_gpus[1]:
            problems.append(f"{label} serves other GPUs than {first_gpus[0]}")
    return problems
