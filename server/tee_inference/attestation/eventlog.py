"""TDX event logs in dstack's JSON form: parsing, RTMR replay, runtime-event digests, descriptions.

An RTMR starts as 48 zero bytes and is extended as ``r = sha384(r ‖ digest)``. Replay uses each
event's recorded ``digest``: firmware and boot-loader events (RTMR0–2) hash their payloads by
several TCG conventions, so recomputing them from the payload is not possible in general. Runtime
events (RTMR3) follow dstack's convention, which ``runtime_event_digest`` reproduces.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tee_inference.exceptions import FormatError

RTMR_COUNT: Final = 4
DIGEST_SIZE: Final = 48  # SHA-384
DSTACK_RUNTIME_EVENT_TYPE: Final = 0x08000001

# Our own RTMR3 events; their payload is UTF-8 JSON. On dstack they come after system-ready.
EVENT_PREFIX: Final = "tee-inference:"
EVENT_IMAGE: Final = "tee-inference:image"
EVENT_MODEL_WEIGHTS: Final = "tee-inference:model-weights"
EVENT_KEYSET: Final = "tee-inference:keyset"
# The GPU ready gate (tee.gpu_gate): the devices this boot attested before letting them work.
EVENT_GPU_GATE: Final = "tee-inference:gpu-gate"
OUR_EVENTS: Final = frozenset({EVENT_IMAGE, EVENT_MODEL_WEIGHTS, EVENT_KEYSET, EVENT_GPU_GATE})

# dstack's OS ends its own RTMR3 measurements with this event; anything after it was emitted by
# the application (dstack's EmitEvent), so platform claims count only before it.
DSTACK_SYSTEM_READY: Final = "system-ready"
# The platform events dstack's OS emits before system-ready (v0.5 releases and later): what an
# application must never be able to claim after it.
DSTACK_PLATFORM_EVENTS: Final = frozenset({
    "system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done", "mr-kms",
    "os-image-hash", "key-provider", "storage-fs", "init-script-hash", "gpu-policy-hash",
    "gpu-attestation", DSTACK_SYSTEM_READY,
})  # fmt: skip
# Platform events dstack itself may emit more than once (up to five init scripts).
DSTACK_REPEATABLE_EVENTS: Final = frozenset({"init-script-hash"})

# TCG PC Client Platform Firmware Profile event types seen in TDX boot logs.
TCG_EVENT_TYPES: Final[Mapping[int, str]] = {
    0x00000001: "EV_POST_CODE",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000D: "EV_IPL",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
}

# dstack's runtime events: what each payload holds, and how to show it.
_DSTACK_HEX_EVENTS: Final[Mapping[str, str]] = {
    "app-id": "app id",
    "compose-hash": "compose hash",
    "instance-id": "instance id",
    "os-image-hash": "OS image hash",
    "mr-kms": "KMS measurement",
}
_DSTACK_MARKERS: Final[Mapping[str, str]] = {
    "system-preparing": "boot phase: system preparing",
    "boot-mr-done": "boot phase: boot measurements done",
    "system-ready": "boot phase: system ready",
}


def mrconfigid_for(compose_hash: bytes) -> bytes:
    """dstack's v1 MRCONFIGID, set by the host at launch: ``01 ‖ compose_hash (32) ‖ 00×15``."""
    if len(compose_hash) != 32:
        raise ValueError(f"a compose hash is 32 bytes, got {len(compose_hash)}")
    return b"\x01" + compose_hash + bytes(15)


class EventLogError(FormatError):
    """An event-log entry is malformed; the message names the entry index and the field."""


@dataclass(frozen=True)
class Event:
    imr: int
    event_type: int
    digest: bytes
    event: str
    event_payload: bytes

    def __post_init__(self) -> None:
        if isinstance(self.imr, bool) or not isinstance(self.imr, int) or not 0 <= self.imr < RTMR_COUNT:
            raise EventLogError(f"imr must be an integer 0–3, got {self.imr!r}")
        if isinstance(self.event_type, bool) or not isinstance(self.event_type, int):
            raise EventLogError(f"event_type must be an integer, got {self.event_type!r}")
        if not 0 <= self.event_type <= 0xFFFFFFFF:
            raise EventLogError(f"event_type must fit in 32 bits, got {self.event_type}")
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_SIZE:
            raise EventLogError(f"digest must be {DIGEST_SIZE} bytes (SHA-384), got {self.digest!r:.40}")
        if not isinstance(self.event, str):
            raise EventLogError(f"event must be a string, got {self.event!r}")
        if not isinstance(self.event_payload, bytes):
            raise EventLogError(f"event_payload must be bytes, got {type(self.event_payload).__name__}")

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Event:
        """Read ``{imr, event_type, digest: hex, event, event_payload: hex}`` (dstack's form)."""
        if not isinstance(entry, Mapping):
            raise EventLogError(f"an event must be a JSON object, got {type(entry).__name__}")
        missing = [k for k in ("imr", "event_type", "digest", "event", "event_payload") if k not in entry]
        if missing:
            raise EventLogError(f"missing field(s) {', '.join(missing)}")
        return cls(
            imr=entry["imr"],
            event_type=entry["event_type"],
            digest=_hex_field(entry["digest"], "digest"),
            event=entry["event"],
            event_payload=_hex_field(entry["event_payload"], "event_payload"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "imr": self.imr,
            "event_type": self.event_type,
            "digest": self.digest.hex(),
            "event": self.event,
            "event_payload": self.event_payload.hex(),
        }


def _hex_field(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise EventLogError(f"{name} must be a hex string, got {type(value).__name__}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise EventLogError(f"{name} is not valid hex: {value[:40]!r}") from None


def load_event_log(data: str | bytes | Sequence[Mapping[str, Any]]) -> list[Event]:
    """Read an event log given as a JSON text (str or bytes) or as an already parsed list."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise EventLogError(f"event log is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise EventLogError(f"event log must be a JSON list of events, got {type(data).__name__}")
    events = []
    for index, entry in enumerate(data):
        try:
            events.append(Event.from_dict(entry))
        except EventLogError as exc:
            raise EventLogError(f"event_log[{index}]: {exc}") from None
    return events


def extend(register: bytes, digest: bytes) -> bytes:
    """One RTMR extension: ``sha384(register ‖ digest)``."""
    return hashlib.sha384(register + digest).digest()


def replay(events: Iterable[Event]) -> tuple[bytes, bytes, bytes, bytes]:
    """Replay the log into the RTMR0–3 values it claims to have produced."""
    registers = [bytes(DIGEST_SIZE)] * RTMR_COUNT
    for event in events:
        registers[event.imr] = extend(registers[event.imr], event.digest)
    return (registers[0], registers[1], registers[2], registers[3])


def runtime_event_digest(event_type: int, name: str, payload: bytes) -> bytes:
    """dstack's RTMR3 event digest: ``sha384(u32le(event_type) ‖ ":" ‖ name ‖ ":" ‖ payload)``."""
    return hashlib.sha384(event_type.to_bytes(4, "little") + b":" + name.encode() + b":" + payload).digest()


def check_runtime_digests(events: Sequence[Event]) -> list[int]:
    """Indexes of RTMR3 runtime events whose digest is not what their name and payload give.

    Replay alone proves only that the digests are the ones extended; this proves that the
    names and payloads shown to a person are the ones those digests stand for.
    """
    return [
        index
        for index, e in enumerate(events)
        if e.imr == 3
        and e.event_type == DSTACK_RUNTIME_EVENT_TYPE
        and e.digest != runtime_event_digest(e.event_type, e.event, e.event_payload)
    ]


@dataclass(frozen=True)
class RtmrMismatch:
    rtmr: int
    expected: bytes  # the quote's value
    replayed: bytes
    events: int

    def __str__(self) -> str:
        return (
            f"RTMR{self.rtmr}: quote has {self.expected.hex()}, "
            f"replaying its {self.events} event(s) gives {self.replayed.hex()}"
        )


def compare_rtmrs(events: Sequence[Event], quote_rtmrs: Sequence[bytes]) -> list[RtmrMismatch]:
    """The RTMRs whose replayed value differs from the quote's; empty when the log is consistent."""
    if len(quote_rtmrs) != RTMR_COUNT:
        raise EventLogError(f"expected {RTMR_COUNT} RTMR values from the quote, got {len(quote_rtmrs)}")
    replayed = replay(events)
    counts = [sum(1 for e in events if e.imr == i) for i in range(RTMR_COUNT)]
    return [
        RtmrMismatch(i, bytes(quote_rtmrs[i]), replayed[i], counts[i])
        for i in range(RTMR_COUNT)
        if replayed[i] != quote_rtmrs[i]
    ]


def runtime_event(name: str, payload: bytes) -> Event:
    """An RTMR3 event with dstack's event type and digest convention."""
    digest = runtime_event_digest(DSTACK_RUNTIME_EVENT_TYPE, name, payload)
    return Event(3, DSTACK_RUNTIME_EVENT_TYPE, digest, name, payload)


class EventLog:
    """An append-only, in-memory event log, safe to append to from several threads.

    Appending does not touch hardware: the caller extends the real RTMR with ``event.digest``
    (or, when simulated, simply reports ``rtmrs()``).
    """

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self._events = list(events)
        self._lock = threading.Lock()

    def append(self, event: Event) -> Event:
        with self._lock:
            self._events.append(event)
        return event

    def append_runtime_event(self, name: str, payload: bytes) -> Event:
        return self.append(runtime_event(name, payload))

    @property
    def events(self) -> tuple[Event, ...]:
        with self._lock:
            return tuple(self._events)

    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return replay(self.events)

    def to_list(self) -> list[dict[str, Any]]:
        """The log in the report's JSON form."""
        return [event.to_dict() for event in self.events]


def _short_hex(data: bytes, limit: int = 32) -> str:
    text = data.hex()
    return text if len(text) <= 2 * limit else f"{text[: 2 * limit]}… ({len(data)} bytes)"


def _describe_json(payload: bytes) -> str:
    try:
        value = json.loads(payload.decode())
    except (UnicodeDecodeError, ValueError):
        return f"unreadable payload {_short_hex(payload)}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_clip(str(v))}" for k, v in value.items())
    return _clip(str(value))


def _clip(text: str, limit: int = 72) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_event(event: Event) -> str:
    """A short line for people: what this event measured."""
    name = event.event
    what = {EVENT_IMAGE: "image", EVENT_MODEL_WEIGHTS: "model weights", EVENT_KEYSET: "keyset",
            EVENT_GPU_GATE: "GPU ready gate"}  # fmt: skip
    if name in what:
        return f"tee-inference {what[name]}: {_describe_json(event.event_payload)}"
    if name in _DSTACK_MARKERS:
        return f"dstack {_DSTACK_MARKERS[name]}"
    if name in _DSTACK_HEX_EVENTS:
        return f"dstack {_DSTACK_HEX_EVENTS[name]}: {event.event_payload.hex()}"
    if name == "key-provider":
        return f"dstack key provider: {_describe_json(event.event_payload)}"
    type_name = TCG_EVENT_TYPES.get(event.event_type, f"event type {event.event_type:#010x}")
    label = f"{name!r} " if name else ""
    text = event.event_payload.rstrip(b"\0")
    # Many boot events carry a short ASCII note ("ACPI DATA", "Exit Boot Services Invocation").
    if text and text.isascii() and all(32 <= b < 127 for b in text):
        return f"RTMR{event.imr} {label}{type_name}: {_clip(text.decode())!r}"
    return f"RTMR{event.imr} {label}{type_name}, {len(event.event_payload)}-byte payload"
