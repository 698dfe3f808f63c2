"""TD attributes and XFAM of a TDX TD report: what each bit means and what a production TD sets.

TDATTRIBUTES (8 bytes, little-endian; Intel TDX module 1.5 ABI, ``td_param_attributes_t``)::

    bit  0      DEBUG            the host can read and write the TD's memory and registers
    bits 1–27   reserved         (7:1 "TUD", 27:8 "SEC"): must be 0
    bit 28      SEPT_VE_DISABLE  no #VE on pending-page access (Linux guests refuse to run without it)
    bit 29      MIGRATABLE       the TD may be migrated (its keys leave this platform)
    bit 30      PKS              supervisor protection keys
    bit 31      KL               Key Locker (not allowed by TDX module 1.5)
    bits 32–62  reserved         must be 0
    bit 63      PERFMON          the TD may use performance monitoring

The TDX module rejects bits outside ``FIXED0`` (DEBUG | SEPT_VE_DISABLE | MIGRATABLE | PKS |
PERFMON); a quote that has one set did not come from a module we know. A production TD is not
DEBUG, sets SEPT_VE_DISABLE and is not MIGRATABLE (Google's go-tdx-guest and Tinfoil check the
same; Tinfoil pins exactly 0x10000000).

XFAM (8 bytes, little-endian) is XCR0's layout: which extended CPU state the TD may use (x87,
SSE, AVX, AVX-512, PKRU, CET, AMX, ...). The module requires ``XFAM & ~FIXED0 == 0`` and
``XFAM & FIXED1 == FIXED1``; which features a deployment uses is pinned, when wanted, by the
expected-measurements file (dstack's quotes show 0x602e7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEBUG: Final = 1 << 0
SEPT_VE_DISABLE: Final = 1 << 28
MIGRATABLE: Final = 1 << 29
PKS: Final = 1 << 30
KEY_LOCKER: Final = 1 << 31
PERFMON: Final = 1 << 63
ATTRIBUTES_FIXED0: Final = DEBUG | SEPT_VE_DISABLE | MIGRATABLE | PKS | PERFMON
XFAM_FIXED0: Final = 0x0006_DBE7
XFAM_FIXED1: Final = 0x0000_0003

_NAMES: Final = {
    DEBUG: "DEBUG",
    SEPT_VE_DISABLE: "SEPT_VE_DISABLE",
    MIGRATABLE: "MIGRATABLE",
    PKS: "PKS",
    KEY_LOCKER: "KL",
    PERFMON: "PERFMON",
}


def as_int(field: bytes) -> int:
    """A TD report's 8-byte attributes or XFAM field as the integer the ABI defines."""
    return int.from_bytes(field, "little")


def describe_attributes(value: int) -> str:
    """``0x10000000 (SEPT_VE_DISABLE)``: the value and the names of its set bits."""
    names = [name for bit, name in _NAMES.items() if value & bit]
    reserved = value & ~(ATTRIBUTES_FIXED0 | KEY_LOCKER)
    if reserved:
        names.append(f"reserved bits {reserved:#x}")
    return f"{value:#x} ({', '.join(names) or 'none set'})"


@dataclass(frozen=True)
class TdAttributesPolicy:
    """What a production TD must look like; ``allow_debug`` exists for development hosts only."""

    allow_debug: bool = False
    require_sept_ve_disable: bool = True
    allow_migratable: bool = False

    def problems(self, attributes: int, xfam: int) -> list[str]:
        """Every way these values break the policy or the TDX module's fixed bits (empty: fine)."""
        out = []
        if attributes & DEBUG and not self.allow_debug:
            out.append("DEBUG is set: the host can read the TD's memory")
        if not attributes & SEPT_VE_DISABLE and self.require_sept_ve_disable:
            out.append("SEPT_VE_DISABLE is clear: the guest can be made to take #VE on pending pages")
        if attributes & MIGRATABLE and not self.allow_migratable:
            out.append("MIGRATABLE is set: the TD's state may leave this platform")
        outside = attributes & ~ATTRIBUTES_FIXED0
        if outside:
            out.append(
                f"bits {outside:#x} are outside what the TDX module allows (FIXED0 {ATTRIBUTES_FIXED0:#x})"
            )
        if xfam & ~XFAM_FIXED0 or xfam & XFAM_FIXED1 != XFAM_FIXED1:
            out.append(
                f"XFAM {xfam:#x} breaks the TDX module's fixed bits (FIXED0 {XFAM_FIXED0:#x}, "
                f"FIXED1 {XFAM_FIXED1:#x})"
            )
        return out
