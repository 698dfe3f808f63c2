"""The verifier against our own running server (simulated TEE): SPEC §7 end to end."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.servers import running
from support.simulated_report import simulated_server_expectations
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.middleware import SigningMiddleware

MODEL = "fake-model"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    config = ServerConfig.build(served_models=(MODEL,), model_weights_root=FakeEngine.weights_root())
    with running(SigningMiddleware(FakeEngine(MODEL), services=boot(config))) as base:
        yield base


def _verify(*args: str) -> tuple[int, dict]:
    result = subprocess.run([sys.executable, "-m", "tee_inference", "verify", *args, "--json"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    return result.returncode, json.loads(result.stdout)


def _failed(output: dict) -> list[str]:
    return [c["name"] for c in output["checks"] if c["status"] == "fail"]


def test_verify_url_accepts_simulated_only_when_allowed(url: str, tmp_path: Path) -> None:
    expected = _expect(tmp_path, FakeEngine.weights_root())
    code, out = _verify("url", url, "--model", MODEL, "--allow-simulated", "--expect", str(expected))
    assert code == 1 and _failed(out) == ["tls_binding"]  # plain http is refused outright
    code, out = _verify(
        "url", url, "--model", MODEL, "--allow-simulated", "--expect", str(expected), "--allow-plaintext"
    )
    assert code == 0, _failed(out)
    assert out["ok"] is True
    names = {c["name"]: c["status"] for c in out["checks"]}
    for required in (
        "quote_structure",
        "report_data",
        "event_log_replay",
        "gpu_evidence",
        "gpu_nonce",
        "signature",
    ):
        assert names[required] == "pass"
    code, out = _verify("url", url, "--model", MODEL, "--expect", str(expected), "--allow-plaintext")
    assert code == 1
    assert out["ok"] is False
    assert "quote_signature" in _failed(out)


def _expect(tmp_path: Path, root: str) -> Path:
    path = tmp_path / "expected.json"
    path.write_text(json.dumps(simulated_server_expectations({MODEL: root})))
    return path


def test_verify_saved_report_with_expected_measurements(url: str, tmp_path: Path) -> None:
    nonce = secrets.token_hex(32)
    report = httpx.get(url + "/v1/attestation/report", params={"nonce": nonce, "model": MODEL}).json()
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert report["info"]["model_weights_root"] == FakeEngine.weights_root()
    good = _expect(tmp_path, FakeEngine.weights_root())
    code, out = _verify("report", str(tmp_path / "report.json"), "--nonce", nonce, "--allow-simulated",
                        "--expect", str(good))  # fmt: skip
    assert code == 0, _failed(out)
    assert {c["name"]: c["status"] for c in out["checks"]}["measurements"] == "pass"
    bad = _expect(tmp_path, "00" * 32)
    code, out = _verify("report", str(tmp_path / "report.json"), "--nonce", nonce, "--allow-simulated",
                        "--expect", str(bad))  # fmt: skip
    assert code == 1
    assert "measurements" in _failed(out)
    code, out = _verify(
        "report", str(tmp_path / "report.json"), "--nonce", secrets.token_hex(32), "--allow-simulated",
        "--expect", str(good),
    )  # fmt: skip
    assert code == 1  # a report for another nonce is not fresh
    assert "freshness" in _failed(out)


def test_tampered_report_fails_with_a_specific_check(url: str, tmp_path: Path) -> None:
    nonce = secrets.token_hex(32)
    report = httpx.get(url + "/v1/attestation/report", params={"nonce": nonce}).json()
    quote = bytearray.fromhex(report["intel_quote"])
    quote[568] ^= 1  # report_data
    tampered = {**report, "intel_quote": quote.hex()}
    (tmp_path / "r.json").write_text(json.dumps(tampered))
    code, out = _verify("report", str(tmp_path / "r.json"), "--nonce", nonce, "--allow-simulated")
    assert code == 1
    assert {"quote_signature", "report_data"} <= set(_failed(out))
