"""Event-log parsing, RTMR replay and dstack's runtime-event digests, on the real dstack sample."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tee_inference.attestation.eventlog import (
    DSTACK_RUNTIME_EVENT_TYPE,
    EVENT_IMAGE,
    EVENT_KEYSET,
    EVENT_MODEL_WEIGHTS,
    Event,
    EventLog,
    EventLogError,
    check_runtime_digests,
    compare_rtmrs,
    describe_event,
    load_event_log,
    replay,
    runtime_event_digest,
)
from tee_inference.attestation.simulated_platform import simulated_boot_events
from tee_inference.attestation.tdx_quote import load_quote

DSTACK_RUNTIME_ORDER = [
    "system-preparing",
    "app-id",
    "compose-hash",
    "instance-id",
    "boot-mr-done",
    "mr-kms",
    "os-image-hash",
    "key-provider",
    "system-ready",
]


@pytest.fixture(scope="module")
def dstack(vectors: Path) -> tuple[list[dict[str, Any]], list[Event], tuple[bytes, ...], dict[str, Any]]:
    raw = json.loads((vectors / "dstack" / "event_log.json").read_text())
    quote = load_quote((vectors / "dstack" / "quote.hex").read_text())
    expected = json.loads((vectors / "dstack" / "expected.json").read_text())
    return raw, load_event_log(raw), quote.td_report.rtmrs, expected


def test_dstack_log_replays_to_the_quote(dstack: Any) -> None:
    _, events, quote_rtmrs, expected = dstack
    assert len(events) == 29
    assert [sum(1 for e in events if e.imr == i) for i in range(4)] == [13, 5, 2, 9]
    replayed = replay(events)
    assert replayed == quote_rtmrs
    for i in range(4):
        assert replayed[i].hex() == expected["quote"]["fields"][f"rtmr{i}"]
    assert compare_rtmrs(events, quote_rtmrs) == []


def test_dstack_runtime_digests_follow_the_convention(dstack: Any) -> None:
    _, events, _, _ = dstack
    runtime = [e for e in events if e.imr == 3]
    assert [e.event for e in runtime] == DSTACK_RUNTIME_ORDER
    assert all(e.event_type == DSTACK_RUNTIME_EVENT_TYPE == 0x08000001 for e in runtime)
    assert check_runtime_digests(events) == []
    for e in runtime:
        assert e.digest == runtime_event_digest(e.event_type, e.event, e.event_payload)


def test_boot_event_digests_are_not_all_payload_hashes(dstack: Any) -> None:
    # Why replay must trust the digest field: only some boot events hash their payload directly.
    _, events, _, expected = dstack
    direct = [
        i for i, e in enumerate(events) if e.imr < 3 and e.digest == hashlib.sha384(e.event_payload).digest()
    ]
    assert direct == expected["boot_events_where_digest_equals_sha384_payload"]


def test_one_changed_digest_breaks_exactly_its_rtmr(dstack: Any) -> None:
    _, events, quote_rtmrs, _ = dstack
    for index, event in enumerate(events):
        digest = bytearray(event.digest)
        digest[index % 48] ^= 0x01
        tampered = list(events)
        tampered[index] = Event(event.imr, event.event_type, bytes(digest), event.event, event.event_payload)
        mismatches = compare_rtmrs(tampered, quote_rtmrs)
        assert [m.rtmr for m in mismatches] == [event.imr], index
        assert mismatches[0].expected == quote_rtmrs[event.imr]
        assert f"RTMR{event.imr}: quote has" in str(mismatches[0])
        if event.imr == 3:
            assert check_runtime_digests(tampered) == [index]


def test_changed_runtime_payload_is_caught_even_though_replay_holds(dstack: Any) -> None:
    _, events, quote_rtmrs, _ = dstack
    index = next(i for i, e in enumerate(events) if e.event == "compose-hash")
    e = events[index]
    forged = list(events)
    forged[index] = Event(e.imr, e.event_type, e.digest, e.event, bytes(32))
    assert compare_rtmrs(forged, quote_rtmrs) == []
    assert check_runtime_digests(forged) == [index]


def test_dropped_or_reordered_events_break_the_replay(dstack: Any) -> None:
    _, events, quote_rtmrs, _ = dstack
    assert [m.rtmr for m in compare_rtmrs(events[:-1], quote_rtmrs)] == [3]
    swapped = list(events)
    swapped[20], swapped[21] = swapped[21], swapped[20]
    assert [m.rtmr for m in compare_rtmrs(swapped, quote_rtmrs)] == [3]


def test_dict_round_trip_and_json_forms(vectors: Path, dstack: Any) -> None:
    raw, events, _, _ = dstack
    assert [e.to_dict() for e in events] == raw
    text = (vectors / "dstack" / "event_log.json").read_text()
    assert load_event_log(text) == events
    assert load_event_log(text.encode()) == events
    # dstack's GetQuote response carries the log as a JSON string.
    response = json.loads((vectors / "dstack" / "get_quote_response.json").read_text())
    assert isinstance(response["event_log"], str)
    assert load_event_log(response["event_log"]) == events


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.pop("digest"), r"event_log\[1\]: missing field\(s\) digest"),
        (lambda e: e.update(imr=4), r"event_log\[1\]: imr must be an integer 0–3, got 4"),
        (lambda e: e.update(imr=True), r"event_log\[1\]: imr must be an integer"),
        (lambda e: e.update(imr="0"), r"event_log\[1\]: imr must be an integer"),
        (lambda e: e.update(digest="zz"), r"event_log\[1\]: digest is not valid hex"),
        (lambda e: e.update(digest="00" * 32), r"event_log\[1\]: digest must be 48 bytes"),
        (lambda e: e.update(event_payload=None), r"event_log\[1\]: event_payload must be a hex string"),
        (lambda e: e.update(event_type=-1), r"event_log\[1\]: event_type must fit in 32 bits"),
        (lambda e: e.update(event=3), r"event_log\[1\]: event must be a string"),
    ],
)
def test_bad_entries_name_index_and_field(dstack: Any, mutate: Any, message: str) -> None:
    raw, _, _, _ = dstack
    entries = json.loads(json.dumps(raw[:3]))
    mutate(entries[1])
    with pytest.raises(EventLogError, match=message):
        load_event_log(entries)


def test_bad_containers() -> None:
    with pytest.raises(EventLogError, match="not valid JSON"):
        load_event_log("[{")
    with pytest.raises(EventLogError, match="must be a JSON list"):
        load_event_log('{"imr": 0}')
    with pytest.raises(EventLogError, match=r"event_log\[0\]: an event must be a JSON object"):
        load_event_log("[1]")
    with pytest.raises(EventLogError, match="expected 4 RTMR values"):
        compare_rtmrs([], [bytes(48)] * 3)


def test_runtime_event_digest_is_little_endian_type_colon_name_colon_payload() -> None:
    digest = runtime_event_digest(0x08000001, "app-id", b"\xab\xcd")
    assert digest == hashlib.sha384(b"\x01\x00\x00\x08:app-id:\xab\xcd").digest()
    assert digest != hashlib.sha384(b"\x08\x00\x00\x01:app-id:\xab\xcd").digest()


def test_empty_log_replays_to_zero() -> None:
    assert replay([]) == (bytes(48),) * 4


def test_event_log_builder() -> None:
    boot = simulated_boot_events(b"\x07" * 32)
    log = EventLog(boot)
    payload = json.dumps({"root": "ab" * 32}).encode()
    event = log.append_runtime_event(EVENT_MODEL_WEIGHTS, payload)
    assert event.imr == 3
    assert event.event_type == DSTACK_RUNTIME_EVENT_TYPE
    assert event.digest == runtime_event_digest(DSTACK_RUNTIME_EVENT_TYPE, EVENT_MODEL_WEIGHTS, payload)
    assert log.events == (*boot, event)
    rtmrs = log.rtmrs()
    assert all(r != bytes(48) for r in rtmrs)
    assert rtmrs[3] == hashlib.sha384(bytes(48) + event.digest).digest()
    assert compare_rtmrs(log.events, rtmrs) == []
    assert check_runtime_digests(log.events) == []
    assert load_event_log(json.dumps(log.to_list())) == list(log.events)
    other = Event(3, 0x0D, bytes(48), "custom", b"")
    assert log.append(other) is other
    assert log.events[-1] == other


def test_event_log_appends_from_threads() -> None:
    log = EventLog()
    threads = [
        threading.Thread(
            target=lambda n=n: [log.append_runtime_event(f"e{n}", bytes([i])) for i in range(50)]
        )
        for n in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log.events) == 400
    assert compare_rtmrs(log.events, log.rtmrs()) == []


def test_simulated_boot_events_are_deterministic_and_labelled() -> None:
    a, b = simulated_boot_events(b"\x01" * 32), simulated_boot_events(b"\x01" * 32)
    assert a == b
    assert a != simulated_boot_events(b"\x02" * 32)
    assert {e.imr for e in a} == {0, 1, 2}
    for e in a:
        assert b"SIMULATED" in e.event_payload
        assert e.digest == hashlib.sha384(e.event_payload).digest()
        assert "SIMULATED" in describe_event(e)


def test_describe_dstack_events(dstack: Any) -> None:
    _, events, _, _ = dstack
    by_name = {e.event: describe_event(e) for e in events if e.imr == 3}
    app_id = next(e for e in events if e.event == "app-id").event_payload.hex()
    assert by_name["app-id"] == f"dstack app id: {app_id}"
    assert by_name["compose-hash"].startswith("dstack compose hash: 62dd36d2")
    assert by_name["system-ready"] == "dstack boot phase: system ready"
    assert by_name["key-provider"].startswith("dstack key provider: name=kms, id=30593013")
    assert "KMS" in by_name["mr-kms"]
    assert "OS image hash" in by_name["os-image-hash"]
    boot = [describe_event(e) for e in events if e.imr < 3]
    assert boot[0] == "RTMR0 EV_EFI_HANDOFF_TABLES2, 42-byte payload"
    assert "RTMR1 EV_EFI_ACTION: 'Exit Boot Services Invocation'" in boot


def test_describe_our_events() -> None:
    image = Event(3, DSTACK_RUNTIME_EVENT_TYPE, bytes(48), EVENT_IMAGE, b'{"digest": "sha256:abc"}')
    assert describe_event(image) == "tee-inference image: digest=sha256:abc"
    key = Event(3, DSTACK_RUNTIME_EVENT_TYPE, bytes(48), EVENT_KEYSET, b"not json")
    assert describe_event(key).startswith("tee-inference keyset: unreadable payload")
    unknown = Event(3, 0x12345678, bytes(48), "other", b"\x00\x01")
    assert describe_event(unknown) == "RTMR3 'other' event type 0x12345678, 2-byte payload"
