"""The event log as evidence: replay against the quote, then read what RTMR3 measured.

Only after replay matches the quote and every runtime event's digest matches its name and payload
are the payloads facts; ``read_runtime_events`` is therefore called on a log that passed
``check_event_log``. It reads our events (image, model weights, signing key) and dstack's
(compose hash, OS image hash, instance id, key provider).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tee_inference.attestation.eventlog import (
    DSTACK_RUNTIME_EVENT_TYPE,
    EVENT_IMAGE,
    EVENT_MODEL_WEIGHTS,
    EVENT_SIGNING_KEY,
    RTMR_COUNT,
    Event,
    EventLogError,
    check_runtime_digests,
    compare_rtmrs,
    describe_event,
    load_event_log,
)
from tee_inference.verify.results import CheckResult

EVENT_LOG_REPLAY = "event_log_replay"


@dataclass(frozen=True)
class RuntimeClaims:
    """What RTMR3 says, decoded. Lists keep every occurrence: a key rotation adds a signing-key event."""

    images: tuple[dict[str, Any], ...] = ()
    models: tuple[dict[str, Any], ...] = ()
    signing_keys: tuple[dict[str, Any], ...] = ()
    dstack: dict[str, str] = field(default_factory=dict)  # event name -> hex payload (last wins)
    problems: tuple[str, ...] = ()  # our events whose payload is not the JSON object we emit
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


def read_runtime_events(events: Sequence[Event]) -> RuntimeClaims:
    ours: dict[str, list[dict[str, Any]]] = {EVENT_IMAGE: [], EVENT_MODEL_WEIGHTS: [], EVENT_SIGNING_KEY: []}
    dstack: dict[str, str] = {}
    problems = []
    for index, event in enumerate(events):
        if event.imr != 3 or event.event_type != DSTACK_RUNTIME_EVENT_TYPE:
            continue
        if event.event in ours:
            value = _json_object(event)
            if value is None:
                problems.append(f"event_log[{index}] {event.event}: payload is not a JSON object")
            else:
                ours[event.event].append(value)
        else:
            dstack[event.event] = event.event_payload.hex()
    return RuntimeClaims(
        images=tuple(ours[EVENT_IMAGE]),
        models=tuple(ours[EVENT_MODEL_WEIGHTS]),
        signing_keys=tuple(ours[EVENT_SIGNING_KEY]),
        dstack=dstack,
        problems=tuple(problems),
        descriptions=tuple(describe_event(e) for e in events if e.imr == 3),
    )
