"""One boot, resumed by every serving process over the launcher's handoff socket."""

from __future__ import annotations

import json
import os
import socket
import threading

import anyio
import pytest

from support.simulated_report import simulated_server_expectations
from tee_inference.boot import boot, resume
from tee_inference.boot_state import BootState
from tee_inference.config import ServerConfig
from tee_inference.exceptions import ConfigError, TrustRootError
from tee_inference.handoff import HANDOFF_ENV, HandoffServer, receive_state, services_for_process
from tee_inference.verify import VerificationPolicy, Verifier, parse_expected_measurements

MODEL = "fake-model"
CONFIG = ServerConfig.build(served_models=(MODEL,), model_weights_root="ab" * 32)


def test_resumed_process_signs_with_the_same_key_and_attests_the_same_boot() -> None:
    booted = boot(CONFIG)
    assert booted.boot_state is not None
    with HandoffServer(booted.boot_state) as server:
        first = services_for_process(CONFIG, server.env())
        second = services_for_process(CONFIG, server.env())
    for resumed in (first, second):
        assert resumed.signer.ecdsa.address == booted.signer.ecdsa.address
        assert resumed.signer.ed25519.public_key == booted.signer.ed25519.public_key
        assert resumed.boot_state is None  # a resumed process cannot hand the boot on
        assert resumed.info == booted.info
    # The resumed process's report is the launcher's boot: same simulated machine, same RTMR3 events,
    # no event recorded twice, and it verifies.
    nonce = os.urandom(32)
    report = anyio.run(first.attestation.report, nonce, "ecdsa")
    original = anyio.run(booted.attestation.report, os.urandom(32), "ecdsa")
    assert report.event_log == original.event_log
    assert sum(1 for e in report.event_log if e["event"].startswith("tee-inference:")) == 3
    expected = parse_expected_measurements(json.dumps(simulated_server_expectations({MODEL: "ab" * 32})))
    result = Verifier.production().verify_report(
        report.to_dict(),
        VerificationPolicy.build(expected=[expected], allow_simulated=True),
        nonce=nonce,
        model=MODEL,
    )
    assert result.ok, [c for c in result.blocking]


def test_without_a_launcher_the_process_boots_itself() -> None:
    services = services_for_process(CONFIG, {})
    assert services.boot_state is not None


def test_without_a_launcher_tls_is_refused() -> None:
    # vLLM started by hand serves a certificate it was given; the report would bind another key.
    with pytest.raises(ConfigError, match="start with tee-inference serve"):
        services_for_process(CONFIG.model_copy(update={"tls": "self-signed"}), {})


def test_state_round_trips_and_refuses_garbage() -> None:
    state = BootState(os.urandom(32), "random", None, {"seed": "00" * 32, "runtime_events": []}, {})
    assert BootState.from_json(state.to_json()) == state
    with pytest.raises(TrustRootError, match="malformed"):
        BootState.from_json(b'{"root_secret": "zz"}')


def test_no_launcher_listening_is_a_clear_error() -> None:
    with pytest.raises(TrustRootError, match="no boot handoff from the launcher"):
        receive_state("tee-inference-boot-nobody-here")
    resume_env = {HANDOFF_ENV: "tee-inference-boot-nobody-here"}
    with pytest.raises(TrustRootError, match="no boot handoff"):
        services_for_process(CONFIG, resume_env)


def test_other_users_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    booted = boot(CONFIG)
    assert booted.boot_state is not None
    with HandoffServer(booted.boot_state) as server:
        # The launcher sees our uid as someone else's: it answers nothing.
        monkeypatch.setattr(os, "getuid", lambda: 4242)
        with pytest.raises(TrustRootError, match="closed after 0 of 4 bytes"):
            receive_state(server.name)


def test_oversized_announcement_is_refused() -> None:
    name = f"tee-inference-boot-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + name)
        listener.listen(1)

        def serve_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall((1 << 30).to_bytes(4, "big"))

        thread = threading.Thread(target=serve_once)
        thread.start()
        with pytest.raises(TrustRootError, match="more than any boot state"):
            receive_state(name)
        thread.join()


def test_resume_needs_no_checks_or_events() -> None:
    booted = boot(CONFIG)
    assert booted.boot_state is not None
    resumed = resume(CONFIG, booted.boot_state)
    assert len(resumed.attestation.tdx.event_log()) == len(booted.attestation.tdx.event_log())
