"""Trust roots behind small interfaces, each with a real and a simulated implementation.

- `TdxProvider`: TDX quotes over a 64-byte report_data, RTMR3 events and the event log
  that replays to RTMR0–3 (real: `tee.tdx` on configfs-tsm + the TDX guest device, or
  `tee.dstack` on the dstack guest agent; simulated: `tee.tdx_simulated`).
- `GpuProvider`: NVIDIA confidential-computing state and per-GPU evidence for a nonce
  (real: `tee.gpu_nvml`; simulated: `tee.gpu_simulated`, SPDM evidence under a simulated chain).
- Key sources live in `tee_inference.keys` (random, file, dstack).

Providers are synchronous and may block (kernel interfaces, sockets, NVML): the server
calls them from worker threads, never on the event loop.

A provider's `state()` is what another process of the same boot needs to carry on where this
one left off (a simulation seed, the runtime events already extended), so that the vLLM API
processes resume the boot the launcher ran instead of running it again (`tee_inference.handoff`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tee_inference.attestation.eventlog import Event
from tee_inference.attestation.nvidia_payload import NvidiaPayload

JsonState = dict[str, Any]


@dataclass(frozen=True)
class StartCheck:
    """One fail-closed start check: `ok`, and a one-line reason when not."""

    name: str
    ok: bool
    detail: str


class TdxProvider(Protocol):
    name: str
    simulated: bool

    def check(self) -> list[StartCheck]:
        """Everything this provider needs, checked before the server listens."""
        ...

    def get_quote(self, report_data: bytes) -> bytes:
        """A TDX v4 quote whose report_data is exactly these 64 bytes."""
        ...

    def emit_event(self, name: str, payload: bytes) -> Event:
        """Extend RTMR3 with a runtime event (dstack digest convention) and log it."""
        ...

    def event_log(self) -> list[Event]:
        """The events that replay to RTMR0–3 of a quote taken now."""
        ...

    def state(self) -> JsonState:
        """What a process resuming this boot needs (JSON values); see `resume_tdx`."""
        ...


class GpuProvider(Protocol):
    name: str
    simulated: bool

    def check(self) -> list[StartCheck]:
        """Per GPU: present, confidential computing on, devtools off, ready."""
        ...

    def evidence(self, nonce: bytes) -> NvidiaPayload:
        """Evidence from every GPU for this 32-byte nonce, in NRAS v3 payload form."""
        ...

    def gate_record(self) -> JsonState | None:
        """What the boot's GPU ready gate attested (``tee.gpu_gate``), once it passed; else None."""
        ...

    def state(self) -> JsonState:
        """What a process resuming this boot needs (JSON values); see `resume_gpu`."""
        ...
