"""The dstack client, provider and key source against a fake guest agent on a real Unix socket."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.dstack import FakeDstackAgent, serve_fake_dstack
from tee_inference.attestation.eventlog import Event, compare_rtmrs, load_event_log
from tee_inference.attestation.tdx_quote import load_quote, parse_quote
from tee_inference.config import DSTACK_KEY_PATH
from tee_inference.exceptions import KeySourceError, TrustRootError
from tee_inference.keys import KeySource, derive_signer
from tee_inference.tee import TdxProvider
from tee_inference.tee.dstack import (
    DstackClient,
    DstackError,
    DstackKeyError,
    DstackKeySource,
    DstackTdxProvider,
    DstackUnavailableError,
    parse_get_key_response,
    parse_get_quote_response,
    parse_info_response,
)

REPORT_DATA = bytes(range(64))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ds", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def agent(short_dir: Path) -> Iterator[tuple[FakeDstackAgent, DstackClient]]:
    socket = short_dir / "dstack.sock"
    with serve_fake_dstack(socket) as fake:
        client = DstackClient(socket, timeout_s=5)
        yield fake, client
        client.close()


def test_key_source_is_stable_and_derives_signers(agent: tuple[FakeDstackAgent, DstackClient]) -> None:
    fake, client = agent
    source: KeySource = DstackKeySource(client)
    assert source.name == "dstack" and source.development_only is False
    first, second = source.root_secret(), source.root_secret()
    assert first == second == fake.key_for(DSTACK_KEY_PATH, "signing")
    a, b = derive_signer(first, 0), derive_signer(second, 0)
    assert a.ecdsa.address == b.ecdsa.address
    assert DstackKeySource(client, key_path="other").root_secret() != first
    assert fake.requests[0] == ("/GetKey", {"path": DSTACK_KEY_PATH, "purpose": "signing"})


def test_key_errors_are_key_source_errors_without_key_material(
    agent: tuple[FakeDstackAgent, DstackClient],
) -> None:
    fake, client = agent
    secret_hex = "ab" * 32
    fake.fail_next = (500, json.dumps({"error": "boom", "key": secret_hex}).encode())
    with pytest.raises(DstackKeyError) as info:
        DstackKeySource(client).root_secret()
    assert isinstance(info.value, KeySourceError) and isinstance(info.value, TrustRootError)
    assert secret_hex not in str(info.value) and "HTTP 500" in str(info.value)
    with pytest.raises(ValueError, match="no hex 'key'") as bad:
        parse_get_key_response({"key": "zz" + secret_hex})
    assert secret_hex not in str(bad.value)
    assert "ab" * 4 not in repr(parse_get_key_response({"key": secret_hex, "signature_chain": []}))


def test_short_key_refused(agent: tuple[FakeDstackAgent, DstackClient]) -> None:
    fake, client = agent
    fake.fail_next = (200, json.dumps({"key": "00" * 16, "signature_chain": []}).encode())
    with pytest.raises(DstackKeyError, match="fewer than the 32"):
        DstackKeySource(client).root_secret()


def test_quote_report_data_round_trip(agent: tuple[FakeDstackAgent, DstackClient]) -> None:
    _, client = agent
    provider: TdxProvider = DstackTdxProvider(client)
    assert provider.name == "dstack" and not provider.simulated
    quote = parse_quote(provider.get_quote(REPORT_DATA))
    assert quote.report_data == REPORT_DATA
    reply = client.get_quote(REPORT_DATA)
    assert reply.report_data == REPORT_DATA and reply.vm_config == "{}"


def test_emitted_events_replay_to_quote_rtmr3(agent: tuple[FakeDstackAgent, DstackClient]) -> None:
    _, client = agent
    provider = DstackTdxProvider(client)
    emitted = [provider.emit_event(f"tee-inference:e{i}", f"payload {i}".encode()) for i in range(3)]
    log = provider.event_log()
    assert log[-3:] == emitted  # the agent logged exactly the events whose digests we computed
    quote = parse_quote(provider.get_quote(REPORT_DATA))
    assert compare_rtmrs(log, quote.td_report.rtmrs) == []
    # The quote's own event log says the same.
    assert client.get_quote(REPORT_DATA).event_log == log


def test_check(agent: tuple[FakeDstackAgent, DstackClient]) -> None:
    _, client = agent
    [result] = DstackTdxProvider(client).check()
    assert result.ok and "dstack.sock" in result.detail
    assert DstackTdxProvider(client.socket_path).client.socket_path == client.socket_path


def test_agent_down_names_the_socket(short_dir: Path) -> None:
    socket = short_dir / "dstack.sock"
    client = DstackClient(socket, timeout_s=2)
    with pytest.raises(DstackUnavailableError, match=f"not reachable at {socket}: no such socket"):
        client.info()
    with pytest.raises(DstackKeyError, match=str(socket)):
        DstackKeySource(client).root_secret()
    [result] = DstackTdxProvider(client).check()
    assert not result.ok and str(socket) in result.detail


def test_stale_socket_is_connection_refused(short_dir: Path) -> None:
    socket = short_dir / "dstack.sock"
    with serve_fake_dstack(socket):
        pass
    if not socket.exists():  # uvicorn removes its socket on a clean shutdown; make a stale one
        import socket as sk

        s = sk.socket(sk.AF_UNIX)
        s.bind(str(socket))
        s.close()
    with pytest.raises(DstackUnavailableError, match="connection refused"):
        DstackClient(socket, timeout_s=2).info()


def test_http_500_is_a_clear_error(agent: tuple[FakeDstackAgent, DstackClient]) -> None:
    fake, client = agent
    fake.fail_next = (500, b'{"error": "quote service unavailable"}')
    with pytest.raises(DstackError, match=r"/GetQuote\): HTTP 500: quote service unavailable"):
        DstackTdxProvider(client).get_quote(REPORT_DATA)


def test_malformed_json_is_a_clear_error(agent: tuple[FakeDstackAgent, DstackClient]) -> None:
    fake, client = agent
    fake.fail_next = (200, b"{not json")
    with pytest.raises(DstackError, match="reply is not valid JSON"):
        client.info()
    fake.fail_next = (200, b'{"quote": "00", "event_log": "[{]"}')
    with pytest.raises(DstackError, match="GetQuote: GetQuote event_log: event log is not valid JSON"):
        client.get_quote(REPORT_DATA)


def test_quote_for_other_report_data_is_refused(agent: tuple[FakeDstackAgent, DstackClient]) -> None:
    fake, client = agent
    other = fake._quote((b"\x01" * 64).hex())
    fake.fail_next = (200, json.dumps(other).encode())
    with pytest.raises(DstackError, match="is not the requested"):
        DstackTdxProvider(client).get_quote(REPORT_DATA)


def test_legacy_tappd(short_dir: Path) -> None:
    socket = short_dir / "tappd.sock"
    with serve_fake_dstack(socket) as fake:
        client = DstackClient(socket, timeout_s=5)
        assert client.api == "tappd"
        assert parse_quote(DstackTdxProvider(client).get_quote(REPORT_DATA)).report_data == REPORT_DATA
        assert DstackKeySource(client).root_secret() == fake.key_for(DSTACK_KEY_PATH, "signing")
        assert client.info().event_log == list(fake.log.events)
        with pytest.raises(DstackError, match="no EmitEvent"):
            client.emit_event("x", b"")
        assert [p for p, _ in fake.requests] == [
            "/prpc/Tappd.TdxQuote",
            "/prpc/Tappd.DeriveK256Key",
            "/prpc/Tappd.Info",
        ]
        client.close()


def test_real_dstack_get_quote_response_vector(vectors: Path) -> None:
    reply = json.loads((vectors / "dstack" / "get_quote_response.json").read_text())
    parsed = parse_get_quote_response(reply)
    quote = parse_quote(parsed.quote)
    assert quote.report_data == b"\x01" * 64
    assert parsed.quote == load_quote((vectors / "dstack" / "quote.hex").read_text()).raw
    assert len(parsed.event_log) == 29
    assert compare_rtmrs(parsed.event_log, quote.td_report.rtmrs) == []
    assert parsed.event_log == load_event_log(json.loads((vectors / "dstack" / "event_log.json").read_text()))


def test_real_dstack_info_vector(vectors: Path) -> None:
    info = parse_info_response(json.loads((vectors / "dstack" / "info.json").read_text()))
    assert info.app_id == "ab84a54bdaf082be00ea40e8e37bdeb5c15c58de"
    assert len(info.event_log) == 29
    assert info.tcb_info["mrtd"].startswith("f06dfda6")


# -- dstack OS releases without EmitEvent -------------------------------------------------------------


def test_without_emit_event_the_agent_path_refuses_to_record(short_dir: Path) -> None:
    with serve_fake_dstack(short_dir / "agent.sock", FakeDstackAgent(emit_event=False)):
        provider = DstackTdxProvider(DstackClient(short_dir / "agent.sock", timeout_s=5))
        with pytest.raises(TrustRootError, match="EmitEvent"):
            provider.emit_event("tee-inference:image", b"{}")


def test_native_events_replay_after_the_agents_own(short_dir: Path) -> None:
    from fakes.tdx_guest import FakeTdxGuestDevice
    from tee_inference.tee.dstack import DstackNativeEventsProvider
    from tee_inference.tee.tdx_guest import TdxGuest

    device = FakeTdxGuestDevice(short_dir / "device")
    agent = FakeDstackAgent(emit_event=False, device=device)
    with serve_fake_dstack(short_dir / "agent.sock", agent):
        guest = TdxGuest(device.device, device.measurements, io=device)
        provider: TdxProvider = DstackNativeEventsProvider(
            DstackClient(short_dir / "agent.sock", timeout_s=5), guest
        )
        assert provider.name == "dstack-native" and not provider.simulated
        assert all(check.ok for check in provider.check()), provider.check()
        emitted = [provider.emit_event(f"tee-inference:e{i}", f"payload {i}".encode()) for i in range(3)]
        assert [digest for _, index, digest in device.extends if index == 3] == [e.digest for e in emitted]
        log = provider.event_log()
        platform = [e.event for e in log if e.imr == 3][:3]
        assert platform == ["system-preparing", "app-id", "system-ready"] and log[-3:] == emitted
        quote = parse_quote(provider.get_quote(REPORT_DATA))
        assert compare_rtmrs(log, quote.td_report.rtmrs) == []
        assert not [path for path, _ in agent.requests if path == "/EmitEvent"]
        # Another API process resumes the boot from its state: the same log, nothing extended again.
        resumed = DstackNativeEventsProvider(
            DstackClient(short_dir / "agent.sock", timeout_s=5), guest,
            runtime_events=[Event.from_dict(e) for e in provider.state()["runtime_events"]],
        )  # fmt: skip
        assert resumed.event_log() == log and len(device.extends) == 3
