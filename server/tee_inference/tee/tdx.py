"""The real TDX provider on a bare TDX guest: configfs-tsm quotes, tdx_guest RTMR3, CCEL boot log.

Quotes come from the kernel's configfs-tsm interface (:mod:`configfs_tsm`), RTMR3 is extended
through the TDX guest device (:mod:`tdx_guest`), and the RTMR0–2 boot events are read from the
firmware's CCEL table (parsed by :mod:`tee_inference.attestation.ccel`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Final

from tee_inference.attestation.ccel import CcelError, parse_ccel
from tee_inference.attestation.eventlog import Event, runtime_event
from tee_inference.exceptions import TrustRootError
from tee_inference.tee import JsonState, StartCheck
from tee_inference.tee.configfs_tsm import ConfigfsTsm
from tee_inference.tee.tdx_guest import TdxGuest

log = logging.getLogger(__name__)

CCEL_PATH: Final = Path("/sys/firmware/acpi/tables/data/CCEL")


class NativeRtmr3:
    """RTMR3 extended through the TDX guest device, and the events extended so far, in order.

    Shared by the bare-TDX provider and the dstack one for OS releases without EmitEvent.
    ``runtime_events`` resumes a boot whose RTMR3 events another process already extended.
    """

    def __init__(self, guest: TdxGuest | None = None, runtime_events: list[Event] | None = None) -> None:
        self.guest = guest if guest is not None else TdxGuest()
        self._runtime: list[Event] = list(runtime_events or ())
        # Extending and logging must happen in the same order, or the log stops replaying.
        self._lock = threading.Lock()

    def emit_event(self, name: str, payload: bytes) -> Event:
        event = runtime_event(name, payload)
        with self._lock:
            self.guest.extend_rtmr(3, event.digest)
            self._runtime.append(event)
        return event

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._runtime)

    def state(self) -> JsonState:
        with self._lock:
            return {"runtime_events": [event.to_dict() for event in self._runtime]}


class ConfigfsTdxProvider:
    """TdxProvider for a TDX guest without dstack: quotes via configfs-tsm, RTMR3 via tdx_guest."""

    name = "tdx"
    simulated = False

    def __init__(
        self,
        tsm: ConfigfsTsm | None = None,
        guest: TdxGuest | None = None,
        ccel_path: Path = CCEL_PATH,
        runtime_events: list[Event] | None = None,
    ) -> None:
        """``runtime_events`` resumes a boot whose RTMR3 events another process already extended."""
        self._tsm = tsm if tsm is not None else ConfigfsTsm()
        self._rtmr3 = NativeRtmr3(guest, runtime_events)
        self._ccel_path = ccel_path
        self._boot_events: list[Event] | None = None

    def check(self) -> list[StartCheck]:
        """configfs-tsm, the guest device and the boot log; the caller takes the test quote."""
        results = self._tsm.check()
        results.extend(self._rtmr3.guest.check())
        try:
            boot = self._load_boot_events()
            detail = f"{len(boot)} boot events from {self._ccel_path}" if boot else f"no {self._ccel_path}"
            results.append(StartCheck("tdx event log", True, detail))
        except (CcelError, TrustRootError) as exc:
            results.append(StartCheck("tdx event log", False, str(exc)))
        return results

    def get_quote(self, report_data: bytes) -> bytes:
        return self._tsm.get_quote(report_data)

    def emit_event(self, name: str, payload: bytes) -> Event:
        return self._rtmr3.emit_event(name, payload)

    def event_log(self) -> list[Event]:
        return [*self._load_boot_events(), *self._rtmr3.events()]

    def state(self) -> JsonState:
        return self._rtmr3.state()

    def _load_boot_events(self) -> list[Event]:
        # Read once: the firmware's log does not change after boot.
        if self._boot_events is None:
            try:
                data = self._ccel_path.read_bytes()
            except FileNotFoundError:
                log.warning("%s not found: the event log will have no RTMR0–2 boot events", self._ccel_path)
                data = b""
            except OSError as exc:
                raise TrustRootError(f"cannot read {self._ccel_path}: {exc.strerror}") from None
            self._boot_events = parse_ccel(data) if data else []
        return self._boot_events
