"""The TdxProvider implementations: simulated, and configfs-tsm + tdx_guest (on faithful fakes)."""

from __future__ import annotations

import hashlib
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fakes.configfs_tsm import FakeConfigfsTsm
from fakes.tdx_guest import FakeTdxGuestDevice
from tee_inference.attestation.ccel import CcelError, parse_ccel
from tee_inference.attestation.eventlog import (
    DSTACK_RUNTIME_EVENT_TYPE,
    compare_rtmrs,
    replay,
    runtime_event_digest,
)
from tee_inference.attestation.simulated_platform import SIMULATED_MRTD
from tee_inference.attestation.tdx_quote import parse_quote, verify_quote_ecdsa
from tee_inference.tee import TdxProvider
from tee_inference.tee.configfs_tsm import ConfigfsTsm
from tee_inference.tee.tdx import ConfigfsTdxProvider
from tee_inference.tee.tdx_guest import TdxGuest
from tee_inference.tee.tdx_simulated import SimulatedTdxProvider

REPORT_DATA = bytes(range(64))


# -- simulated ---------------------------------------------------------------------------------


def test_simulated_is_a_tdx_provider() -> None:
    provider: TdxProvider = SimulatedTdxProvider(bytes(32))
    assert provider.simulated and provider.name == "simulated"
    assert [(r.ok, r.detail) for r in provider.check()] == [(True, "simulated")]


def test_simulated_quote_round_trip() -> None:
    provider = SimulatedTdxProvider(bytes(32))
    quote = parse_quote(provider.get_quote(REPORT_DATA))
    assert quote.report_data == REPORT_DATA
    assert quote.td_report.mrtd == SIMULATED_MRTD
    verify_quote_ecdsa(quote, provider.signer.root_certificate)
    with pytest.raises(ValueError, match="64 bytes"):
        provider.get_quote(b"short")


def test_simulated_seeds() -> None:
    a, b = SimulatedTdxProvider(), SimulatedTdxProvider()
    assert a.seed != b.seed
    assert SimulatedTdxProvider(bytes(32)).event_log() == SimulatedTdxProvider(bytes(32)).event_log()


def test_simulated_event_log_replays_to_quote_after_emits() -> None:
    provider = SimulatedTdxProvider(bytes(32))
    boot = provider.event_log()
    # A simulated dstack boot: firmware events in RTMR0–2, the platform's own RTMR3 events up to
    # system-ready, and MRCONFIGID bound to the compose hash.
    assert {e.imr for e in boot} == {0, 1, 2, 3}
    assert [e.event for e in boot if e.imr == 3][-1] == "system-ready"
    compose = next(e.event_payload for e in boot if e.event == "compose-hash")
    assert parse_quote(provider.get_quote(REPORT_DATA)).td_report.mrconfigid == b"\x01" + compose + bytes(15)
    emitted = [provider.emit_event(f"event-{i}", f"payload {i}".encode()) for i in range(5)]
    for e in emitted:
        assert e.imr == 3 and e.event_type == DSTACK_RUNTIME_EVENT_TYPE
        assert e.digest == runtime_event_digest(DSTACK_RUNTIME_EVENT_TYPE, e.event, e.event_payload)
    log = provider.event_log()
    assert log == [*boot, *emitted]
    quote = parse_quote(provider.get_quote(REPORT_DATA))
    assert compare_rtmrs(log, quote.td_report.rtmrs) == []
    assert quote.td_report.rtmr3 != bytes(48)


def test_simulated_concurrent_quotes() -> None:
    provider = SimulatedTdxProvider(bytes(32))
    provider.emit_event("boot", b"x")

    def one(i: int) -> tuple[bytes, bytes]:
        rd = hashlib.sha512(str(i).encode()).digest()
        return rd, provider.get_quote(rd)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    rtmrs = replay(provider.event_log())
    for rd, raw in results:
        quote = parse_quote(raw)
        assert quote.report_data == rd
        assert quote.td_report.rtmrs == rtmrs


def test_simulated_emits_and_quotes_interleaved() -> None:
    provider = SimulatedTdxProvider(bytes(32))

    def emit(i: int) -> None:
        provider.emit_event(f"e{i}", bytes([i]))

    def quote(_: int) -> bytes:
        return provider.get_quote(REPORT_DATA)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(emit, range(20)))
        quotes = list(pool.map(quote, range(8)))
    log = provider.event_log()
    assert sum(1 for e in log if e.event.startswith("e")) == 20
    for raw in quotes:
        assert compare_rtmrs(log, parse_quote(raw).td_report.rtmrs) == []


# -- CCEL ----------------------------------------------------------------------------------------


def ccel(records: list[tuple[int, int, bytes, bytes]], *, algs: tuple[int, ...] = (0x000C,)) -> bytes:
    """A TCG2 crypto-agile log as TDVF writes it: Spec ID header, TCG_PCR_EVENT2 records, 0xFF tail."""
    sizes = {0x0004: 20, 0x000B: 32, 0x000C: 48}
    spec = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
    spec += b"".join(struct.pack("<HH", a, sizes[a]) for a in algs) + b"\0"
    out = struct.pack("<II20sI", 0, 3, bytes(20), len(spec)) + spec
    for mr_index, event_type, digest, payload in records:
        digests = b"".join(struct.pack("<H", a) + (digest if a == 0x000C else bytes(sizes[a])) for a in algs)
        out += struct.pack("<III", mr_index, event_type, len(algs)) + digests
        out += struct.pack("<I", len(payload)) + payload
    return out + b"\xff" * 64


def test_parse_ccel() -> None:
    d = [hashlib.sha384(bytes([i])).digest() for i in range(5)]
    data = ccel(
        [
            (0, 0x80000008, d[0], b"mrtd measured"),  # MRTD: not an RTMR
            (1, 0x80000001, d[1], b"var"),
            (1, 3, d[2], b"no action"),  # EV_NO_ACTION: never extended
            (2, 0x80000003, d[3], b"boot loader"),
            (3, 0x6, d[4], b"initrd"),
        ],
        algs=(0x0004, 0x000C),
    )
    events = parse_ccel(data)
    assert [(e.imr, e.event_type, e.digest, e.event_payload) for e in events] == [
        (0, 0x80000001, d[1], b"var"),
        (1, 0x80000003, d[3], b"boot loader"),
        (2, 0x6, d[4], b"initrd"),
    ]


def test_parse_ccel_errors() -> None:
    with pytest.raises(CcelError, match="too short"):
        parse_ccel(b"\0" * 8)
    with pytest.raises(CcelError, match="Spec ID"):
        parse_ccel(struct.pack("<II20sI", 0, 4, bytes(20), 0) + bytes(64))
    with pytest.raises(CcelError, match="no SHA-384"):
        parse_ccel(ccel([], algs=(0x000B,)))
    good = ccel([(1, 1, bytes(48), b"payload")])
    with pytest.raises(CcelError, match="offset"):
        parse_ccel(good[: len(good) - 64 - 3])


# -- configfs-tsm + tdx_guest ------------------------------------------------------------------------


@pytest.fixture
def real(tmp_path: Path) -> tuple[ConfigfsTdxProvider, FakeConfigfsTsm, FakeTdxGuestDevice, Path]:
    tsm_fake = FakeConfigfsTsm(tmp_path / "tsm")
    device = FakeTdxGuestDevice(tmp_path / "device")
    ccel_path = tmp_path / "CCEL"
    provider = ConfigfsTdxProvider(
        ConfigfsTsm(tsm_fake.root, fs=tsm_fake),
        TdxGuest(device.device, device.measurements, io=device),
        ccel_path,
    )
    return provider, tsm_fake, device, ccel_path


def test_configfs_provider_quote_and_events(
    real: tuple[ConfigfsTdxProvider, FakeConfigfsTsm, FakeTdxGuestDevice, Path],
) -> None:
    provider, tsm_fake, device, ccel_path = real
    boot = [hashlib.sha384(bytes([i])).digest() for i in range(3)]
    ccel_path.write_bytes(ccel([(i + 1, 0x80000001, boot[i], b"boot") for i in range(3)]))
    # The fake device's RTMR0–2 hold what the firmware extended, as on a real machine.
    for i in range(3):
        device.rtmrs[i] = hashlib.sha384(bytes(48) + boot[i]).digest()
    assert not provider.simulated
    assert parse_quote(provider.get_quote(REPORT_DATA)).report_data == REPORT_DATA
    e1 = provider.emit_event("tee-inference:image", b'{"digest": "x"}')
    e2 = provider.emit_event("tee-inference:model-weights", b"{}")
    assert [x[2] for x in device.extends] == [e1.digest, e2.digest]
    log = provider.event_log()
    assert log[-2:] == [e1, e2]
    assert compare_rtmrs(log, TdxGuest(device.device, device.measurements, io=device).read_rtmrs()) == []
    results = provider.check()
    assert all(r.ok for r in results), results
    assert "3 boot events" in results[-1].detail
    assert tsm_fake.entries() == []


def test_configfs_provider_without_ccel(
    real: tuple[ConfigfsTdxProvider, FakeConfigfsTsm, FakeTdxGuestDevice, Path],
) -> None:
    provider, *_ = real
    provider.emit_event("x", b"")
    assert [e.event for e in provider.event_log()] == ["x"]


def test_configfs_provider_check_names_every_missing_root(tmp_path: Path) -> None:
    provider = ConfigfsTdxProvider(
        ConfigfsTsm(tmp_path / "tsm" / "report"),
        TdxGuest(tmp_path / "tdx_guest", tmp_path / "measurements"),
        tmp_path / "CCEL",
    )
    failed = {r.name: r.detail for r in provider.check() if not r.ok}
    assert "configfs-tsm not available at" in failed["configfs-tsm"]
    assert "TDX guest device not available at" in failed["tdx guest device"]
