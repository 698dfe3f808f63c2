"""The real TDX provider on a bare TDX guest: configfs-tsm quotes, tdx_guest RTMR3, CCEL boot log.

The boot events for RTMR0–2 come from the firmware's event log, which TDVF publishes as the
ACPI CCEL table; Linux exposes its data at ``/sys/firmware/acpi/tables/data/CCEL``. It is a
TCG2 "crypto agile" log (TCG PC Client Platform Firmware Profile, §10): a legacy-format
``Spec ID Event03`` header naming the digest sizes, then ``TCG_PCR_EVENT2`` records. In CCEL the
"PCR" index is a TDX measurement register: 0 = MRTD, 1–4 = RTMR0–3; we report RTMRs as imr 0–3,
as dstack does. No Python library parses this format without pulling in TPM tooling, and the
subset needed (walk records, keep SHA-384 digests) is small.
"""

from __future__ import annotations

import logging
import struct
import threading
from pathlib import Path
from typing import Final

from tee_inference.attestation.eventlog import Event, runtime_event
from tee_inference.tee import CheckResult, TrustRootError
from tee_inference.tee.configfs_tsm import ConfigfsTsm
from tee_inference.tee.tdx_guest import TdxGuest

log = logging.getLogger(__name__)

CCEL_PATH: Final = Path("/sys/firmware/acpi/tables/data/CCEL")
TPM_ALG_SHA384: Final = 0x000C
EV_NO_ACTION: Final = 0x00000003
_SPEC_ID_SIGNATURE: Final = b"Spec ID Event03\0"
_LEGACY_HEADER: Final = struct.Struct("<II20sI")  # pcrIndex, eventType, SHA-1 digest, eventSize


class CcelError(TrustRootError):
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


class ConfigfsTdxProvider:
    """TdxProvider for a TDX guest without dstack: quotes via configfs-tsm, RTMR3 via tdx_guest."""

    name = "tdx"
    simulated = False

    def __init__(
        self,
        tsm: ConfigfsTsm | None = None,
        guest: TdxGuest | None = None,
        ccel_path: Path = CCEL_PATH,
    ) -> None:
        self._tsm = tsm if tsm is not None else ConfigfsTsm()
        self._guest = guest if guest is not None else TdxGuest()
        self._ccel_path = ccel_path
        self._boot_events: list[Event] | None = None
        self._runtime: list[Event] = []
        # Extending and logging must happen in the same order, or the log stops replaying.
        self._lock = threading.Lock()

    def check(self) -> list[CheckResult]:
        """configfs-tsm, the guest device and the boot log; the caller takes the test quote."""
        results = self._tsm.check()
        results.extend(self._guest.check())
        try:
            boot = self._load_boot_events()
            detail = f"{len(boot)} boot events from {self._ccel_path}" if boot else f"no {self._ccel_path}"
            results.append(CheckResult("tdx event log", True, detail))
        except CcelError as exc:
            results.append(CheckResult("tdx event log", False, str(exc)))
        return results

    def get_quote(self, report_data: bytes) -> bytes:
        return self._tsm.get_quote(report_data)

    def emit_event(self, name: str, payload: bytes) -> Event:
        event = runtime_event(name, payload)
        with self._lock:
            self._guest.extend_rtmr(3, event.digest)
            self._runtime.append(event)
        return event

    def event_log(self) -> list[Event]:
        boot = self._load_boot_events()
        with self._lock:
            return [*boot, *self._runtime]

    def _load_boot_events(self) -> list[Event]:
        # Read once: the firmware's log does not change after boot.
        if self._boot_events is None:
            try:
                data = self._ccel_path.read_bytes()
            except FileNotFoundError:
                log.warning("%s not found: the event log will have no RTMR0–2 boot events", self._ccel_path)
                data = b""
            except OSError as exc:
                raise CcelError(f"cannot read {self._ccel_path}: {exc.strerror}") from None
            self._boot_events = parse_ccel(data) if data else []
        return self._boot_events
