"""A simulated TDX provider: real quote layout and event-log replay, signed by a local SIMULATED key.

Everything a verifier checks structurally holds (report_data at offset 568, RTMR0–3 equal to the
replay of the event log, MRCONFIGID bound to the compose hash, dstack's RTMR3 phases, an ECDSA-P256
quote signature under a PCK-shaped chain); the chain's root is a local simulation root, so a
verifier accepts it only when told to allow simulated reports. The platform it pretends to be is
`attestation.simulated_platform`: fixed MRTD and RTMR0–2, so an expected file can pin them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tee_inference.attestation.eventlog import Event, EventLog, runtime_event
from tee_inference.attestation.simulated_platform import (
    SIMULATED_DEFAULT_COMPOSE,
    SIMULATED_MRTD,
    SimulatedPlatform,
)
from tee_inference.attestation.tdx_simulated import SimulatedQuoteSigner
from tee_inference.tee import JsonState, StartCheck


class SimulatedTdxProvider:
    name = "simulated"
    simulated = True

    def __init__(
        self,
        seed: bytes | None = None,
        runtime_events: Iterable[Event] = (),
        *,
        compose: bytes = SIMULATED_DEFAULT_COMPOSE,
    ) -> None:
        """A fresh simulated machine per boot unless ``seed`` (32 bytes) makes it reproducible.

        ``compose`` is the app-compose file the simulated CVM launched (its hash is measured as
        dstack measures it); ``runtime_events`` resumes a boot whose RTMR3 events another process
        already recorded.
        """
        self.seed = seed if seed is not None else os.urandom(32)
        self.signer = SimulatedQuoteSigner(self.seed)
        self.platform = SimulatedPlatform.launch(compose, self.seed)
        self._compose = compose
        self._boot_events = self.platform.events()
        # EventLog is safe across threads; a quote reads the registers from one snapshot of it.
        self._log = EventLog([*self._boot_events, *runtime_events])

    def check(self) -> list[StartCheck]:
        return [StartCheck("tdx", True, "simulated")]

    def get_quote(self, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise ValueError(f"report_data must be 64 bytes, got {len(report_data)}")
        return self.signer.quote(
            report_data, mrtd=SIMULATED_MRTD, rtmrs=self._log.rtmrs(), mrconfigid=self.platform.mrconfigid
        )

    def emit_event(self, name: str, payload: bytes) -> Event:
        return self._log.append(runtime_event(name, payload))

    def event_log(self) -> list[Event]:
        return list(self._log.events)

    def state(self) -> JsonState:
        runtime = self._log.events[len(self._boot_events) :]
        return {
            "seed": self.seed.hex(),
            "compose": self._compose.hex(),
            "runtime_events": [event.to_dict() for event in runtime],
        }
