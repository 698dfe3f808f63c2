"""The CLI's one error root: a refusal is one line and an exit code, never a traceback."""

from __future__ import annotations

import pytest

from tee_inference.cli import main
from tee_inference.exceptions import TrustRootError
from tee_inference.tee.tdx_simulated import SimulatedTdxProvider


def test_trust_root_failure_while_recording_boot_events_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(self: SimulatedTdxProvider, name: str, payload: bytes) -> None:
        raise TrustRootError("RTMR3 extend failed: EIO")

    monkeypatch.setattr(SimulatedTdxProvider, "emit_event", broken)
    code = main(["serve", "--engine", "fake", "--port", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "tee-inference: RTMR3 extend failed: EIO" in err.splitlines()
    assert "Traceback" not in err


def test_config_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--engine", "vllm"]) == 2
    assert capsys.readouterr().err.strip() == "tee-inference: --engine vllm needs --model (a model directory)"
    assert main(["serve", "--engine", "fake", "--tee", "tdx", "--key-source", "file", "--key-file", "k"]) == 2


def test_verifier_input_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "report", "/nonexistent/report.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tee-inference: cannot read /nonexistent/report.json")
    assert "Traceback" not in err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "keys", "verify", "measure", "bench"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert command in capsys.readouterr().out
