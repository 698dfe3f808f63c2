"""The event log as evidence: replay against the quote, then read what RTMR3 measured, phase by phase.

Only after replay matches the quote and every runtime event's digest matches its name and payload
are the payloads facts; ``read_runtime_events`` is therefore called on a log that passed
``check_event_log``. Who wrote an event matters as much as what it says, because dstack lets the
application extend RTMR3 through the same API as the platform (EmitEvent). So, as dstack's own
verifier does:

    RTMR3 on dstack:   [platform events … system-ready] [application events …]
      platform events (compose-hash, app-id, instance-id, os-image-hash, key-provider, …)
          count only before the first system-ready, once each
      tee-inference:*  count only after it, once per name (weights: once per model)
      anything else    reported, never trusted

Without a system-ready event (a bare TDX VM, no dstack) there is no platform phase: no platform
claim is read at all, and our events count once per name wherever they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tee_inference.attestation.eventlog import (
    DSTACK_PLATFORM_EVENTS,
    DSTACK_REPEATABLE_EVENTS,
    DSTACK_RUNTIME_EVENT_TYPE,
    DSTACK_SYSTEM_READY,
    EVENT_GPU_GATE,
    EVENT_IMAGE,
    EVENT_KEYSET,
    EVENT_MODEL_WEIGHTS,
    EVENT_PREFIX,
    OUR_EVENTS,
    RTMR_COUNT,
    Event,
    EventLogError,
    check_runtime_digests,
    compare_rtmrs,
    describe_event,
    load_event_log,
)
from tee_inference.verify.results import CheckResult

EVENT_LOG_REPLAY, RUNTIME_EVENTS, RTMR3_EVENTS = "event_log_replay", "runtime_events", "rtmr3_events"


@dataclass(frozen=True)
class RuntimeClaims:
    """What RTMR3 says, read by the rules above. ``problems`` are reasons not to trust the log."""

    platform: dict[str, bytes] = field(default_factory=dict)  # dstack event name -> payload
    dstack: bool = False  # a system-ready event was seen
    image: dict[str, Any] | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # model name -> payload
    keyset: dict[str, Any] | None = None
    gpu_gate: dict[str, Any] | None = None  # the boot's GPU ready gate: the devices it attested
    problems: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()  # events that carry no claim we read (reported, not trusted)
    descriptions: tuple[str, ...] = ()


def check_event_log(
    raw: Any, rtmrs: Sequence[bytes], *, required: bool = True
) -> tuple[list[Event] | None, CheckResult]:
    """Parse and replay; the events come back only when the log is consistent with the quote."""
    if raw is None:
        return None, CheckResult.skipped(EVENT_LOG_REPLAY, "no event log given", required=required)
    try:
        events = load_event_log(raw)
    except EventLogError as exc:
        return None, CheckResult.failed(EVENT_LOG_REPLAY, str(exc), required=required)
    problems = [str(m) for m in compare_rtmrs(events, rtmrs)]
    problems += [
        f"event_log[{i}] ({events[i].event!r}): digest is not sha384(type:name:payload), so its "
        "name or payload was altered"
        for i in check_runtime_digests(events)
    ]
    if problems:
        return None, CheckResult.failed(EVENT_LOG_REPLAY, "; ".join(problems), required=required)
    counts = "/".join(str(sum(1 for e in events if e.imr == i)) for i in range(RTMR_COUNT))
    runtime = sum(1 for e in events if e.imr == 3 and e.event_type == DSTACK_RUNTIME_EVENT_TYPE)
    return events, CheckResult.passed(
        EVENT_LOG_REPLAY,
        f"{len(events)} events replay to RTMR0–3 of the quote ({counts} per RTMR); "
        f"{runtime} runtime event digests match their names and payloads",
        required=required,
    )


def _json_object(event: Event) -> dict[str, Any] | None:
    try:
        value = json.loads(event.event_payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class _Reader:
    """One pass over RTMR3's runtime events, collecting claims and every reason to distrust them."""

    def __init__(self, dstack: bool) -> None:
        self.dstack = dstack
        self.platform_phase = dstack  # on dstack the log starts with the platform's events
        self.platform: dict[str, bytes] = {}
        self.ours: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []
        self.ignored: list[str] = []

    def read(self, index: int, event: Event) -> None:
        where = f"event_log[{index}] {event.event!r}"
        if self.platform_phase:
            self._platform(where, event)
        elif event.event.startswith(EVENT_PREFIX):
            self._ours(where, event)
        elif event.event in DSTACK_PLATFORM_EVENTS and self.dstack:
            self.problems.append(
                f"{where} comes after system-ready: an application claiming to be the platform"
            )
        else:
            self.ignored.append(f"{where}: not a claim this verifier reads")

    def _platform(self, where: str, event: Event) -> None:
        name = event.event
        if name == DSTACK_SYSTEM_READY:
            self.platform_phase = False
            return
        if name.startswith(EVENT_PREFIX):
            self.problems.append(f"{where} comes before system-ready, where only the platform writes")
        elif name in self.platform and name not in DSTACK_REPEATABLE_EVENTS:
            self.problems.append(f"{where} appears twice before system-ready")
        elif name not in DSTACK_PLATFORM_EVENTS:
            self.ignored.append(f"{where}: platform event this verifier does not read")
        else:
            self.platform.setdefault(name, event.event_payload)

    def _ours(self, where: str, event: Event) -> None:
        if event.event not in OUR_EVENTS:
            self.ignored.append(f"{where}: not an event this version of tee-inference writes")
            return
        value = _json_object(event)
        if value is None:
            self.problems.append(f"{where}: payload is not the JSON object tee-inference writes")
        elif event.event == EVENT_MODEL_WEIGHTS:
            model = str(value.get("model"))
            if model in self.models:
                self.problems.append(f"{where}: weights of model {model!r} recorded twice")
            self.models.setdefault(model, value)
        elif event.event in self.ours:
            self.problems.append(f"{where} recorded twice: only the first could be the boot's own")
        else:
            self.ours[event.event] = value


def read_runtime_events(events: Sequence[Event]) -> RuntimeClaims:
    """RTMR3's claims by the rules in this module's docstring (call on a replayed log only)."""
    runtime = [
        (i, e) for i, e in enumerate(events) if e.imr == 3 and e.event_type == DSTACK_RUNTIME_EVENT_TYPE
    ]
    reader = _Reader(dstack=any(e.event == DSTACK_SYSTEM_READY for _, e in runtime))
    seen_ready = False
    for index, event in runtime:
        if event.event == DSTACK_SYSTEM_READY and seen_ready:
            reader.problems.append(f"event_log[{index}] 'system-ready' appears a second time")
            continue
        seen_ready = seen_ready or event.event == DSTACK_SYSTEM_READY
        reader.read(index, event)
    return RuntimeClaims(
        platform=reader.platform,
        dstack=reader.dstack,
        image=reader.ours.get(EVENT_IMAGE),
        models=reader.models,
        keyset=reader.ours.get(EVENT_KEYSET),
        gpu_gate=reader.ours.get(EVENT_GPU_GATE),
        problems=tuple(reader.problems),
        ignored=tuple(reader.ignored),
        descriptions=tuple(describe_event(e) for e in events if e.imr == 3),
    )


def check_runtime_events(claims: RuntimeClaims) -> CheckResult:
    """runtime_events: RTMR3 follows the phase rules (no duplicates, no impostors)."""
    if claims.problems:
        return CheckResult.failed(RUNTIME_EVENTS, "; ".join(claims.problems))
    phase = "dstack platform events before system-ready, ours after" if claims.dstack else "no dstack phase"
    ignored = f"; ignored: {'; '.join(claims.ignored)}" if claims.ignored else ""
    return CheckResult.passed(RUNTIME_EVENTS, f"{phase}, each claim once{ignored}")


def describe_runtime_events(claims: RuntimeClaims) -> CheckResult:
    """rtmr3_events (informational): what each RTMR3 event says, for a person reading a bare quote."""
    return CheckResult.passed(RTMR3_EVENTS, "; ".join(claims.descriptions) or "none", required=False)
