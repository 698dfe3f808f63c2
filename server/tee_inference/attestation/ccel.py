"""The TDX firmware event log (ACPI CCEL table): a TCG2 "crypto agile" log of RTMR0–3 extensions.

TDVF publishes the log of what it measured as the ACPI CCEL table; Linux exposes its data at
``/sys/firmware/acpi/tables/data/CCEL``. The format is the TCG PC Client Platform Firmware
Profile's (§10): a legacy-format ``Spec ID Event03`` header naming the digest sizes, then
``TCG_PCR_EVENT2`` records::

    TCG_PCR_EVENT (header, legacy SHA-1 form)
      u32 pcrIndex | u32 eventType (EV_NO_ACTION) | 20 B digest | u32 eventSize | Spec ID event
    TCG_PCR_EVENT2 (each record)
      u32 mrIndex | u32 eventType | u32 digestCount | {u16 algId | digest}×count | u32 eventSize | event

In CCEL the "PCR" index is a TDX measurement register: 0 = MRTD, 1–4 = RTMR0–3; events are
reported with imr 0–3 for RTMR0–3, as dstack does. No Python library parses this format without
pulling in TPM tooling, and the subset needed (walk records, keep SHA-384 digests) is small.
"""

from __future__ import annotations

import struct
from typing import Final

from tee_inference.attestation.eventlog import Event
from tee_inference.exceptions import FormatError

TPM_ALG_SHA384: Final = 0x000C
EV_NO_ACTION: Final = 0x00000003
_SPEC_ID_SIGNATURE: Final = b"Spec ID Event03\0"
_LEGACY_HEADER: Final = struct.Struct("<II20sI")  # pcrIndex, eventType, SHA-1 digest, eventSize


class CcelError(FormatError):
    """The CCEL event log is malformed; the message names the byte offset."""


def parse_ccel(data: bytes) -> list[Event]:
    """RTMR0–3 events of a TDX CCEL log (EV_NO_ACTION and MRTD records are not extensions: dropped)."""
    if len(data) < _LEGACY_HEADER.size:
        raise CcelError(f"CCEL log of {len(data)} bytes is too short for its header")
    _, event_type, _, size = _LEGACY_HEADER.unpack_from(data, 0)
    spec = data[_LEGACY_HEADER.size : _LEGACY_HEADER.size + size]
    if event_type != EV_NO_ACTION or not spec.startswith(_SPEC_ID_SIGNATURE):
        raise CcelError("CCEL log does not start with a TCG2 'Spec ID Event03' header (offset 0)")
    digest_sizes = _spec_digest_sizes(spec)
    if TPM_ALG_SHA384 not in digest_sizes:
        raise CcelError("CCEL log records no SHA-384 digests; TDX RTMRs are SHA-384")
    pos = _LEGACY_HEADER.size + size
    events = []
    while pos + 8 <= len(data):
        mr_index, event_type = struct.unpack_from("<II", data, pos)
        # The table is reserved larger than the log; the unused tail is 0xFF (or zero) filled.
        if (mr_index, event_type) in ((0xFFFFFFFF, 0xFFFFFFFF), (0, 0)):
            break
        start = pos
        pos, digests = _read_digests(data, pos + 8, digest_sizes)
        event_size = _u32(data, pos, "eventSize")
        payload = data[pos + 4 : pos + 4 + event_size]
        if len(payload) != event_size:
            raise CcelError(f"CCEL event at offset {start}: eventSize {event_size} runs past the log")
        pos += 4 + event_size
        if event_type == EV_NO_ACTION or not 1 <= mr_index <= 4:
            continue
        if TPM_ALG_SHA384 not in digests:
            raise CcelError(f"CCEL event at offset {start} has no SHA-384 digest")
        events.append(Event(mr_index - 1, event_type, digests[TPM_ALG_SHA384], "", payload))
    return events


def _u32(data: bytes, pos: int, name: str) -> int:
    if pos + 4 > len(data):
        raise CcelError(f"CCEL log truncated at offset {pos} reading {name}")
    return int.from_bytes(data[pos : pos + 4], "little")


def _spec_digest_sizes(spec: bytes) -> dict[int, int]:
    # TCG_EfiSpecIDEvent: signature (16), platformClass u32, 4 version/uintn bytes, numberOfAlgorithms.
    if len(spec) < 28:
        raise CcelError("CCEL Spec ID event is truncated")
    count = int.from_bytes(spec[24:28], "little")
    if len(spec) < 28 + 4 * count:
        raise CcelError(f"CCEL Spec ID event lists {count} algorithms but is only {len(spec)} bytes")
    return {
        int.from_bytes(spec[28 + 4 * i : 30 + 4 * i], "little"): int.from_bytes(
            spec[30 + 4 * i : 32 + 4 * i], "little"
        )
        for i in range(count)
    }


def _read_digests(data: bytes, pos: int, sizes: dict[int, int]) -> tuple[int, dict[int, bytes]]:
    count = _u32(data, pos, "digest count")
    pos += 4
    digests = {}
    for _ in range(count):
        if pos + 2 > len(data):
            raise CcelError(f"CCEL log truncated at offset {pos} reading a digest algorithm")
        alg = int.from_bytes(data[pos : pos + 2], "little")
        if alg not in sizes:
            raise CcelError(f"CCEL digest algorithm {alg:#06x} at offset {pos} is not in the Spec ID header")
        digest = data[pos + 2 : pos + 2 + sizes[alg]]
        if len(digest) != sizes[alg]:
            raise CcelError(f"CCEL log truncated at offset {pos} inside a digest")
        digests[alg] = digest
        pos += 2 + sizes[alg]
    return pos, digests
