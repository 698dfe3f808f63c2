"""The nv-attestation-sdk backend: the subprocess protocol with fake bridges, and the real SDK (slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from support.paths import REPO
from support.simulated_report import SimulatedNode
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload
from tee_inference.cli import main as cli_main
from tee_inference.verify import Status, VerificationPolicy, Verifier
from tee_inference.verify.nvsdk import BRIDGE, GPU_NVIDIA_SDK, NOT_INSTALLED, NvidiaSdkBackend

NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
PAYLOAD = NvidiaPayload(NONCE, (GpuEvidenceEntry(b"\x11\xe0evidence", b"-----BEGIN CERTIFICATE-----\n"),))


def _fake_bridge(tmp_path: Path, body: str) -> NvidiaSdkBackend:
    """A backend whose bridge is ``body``: the real subprocess code runs it with this python."""
    bridge = tmp_path / "fake_bridge.py"
    bridge.write_text("import json, sys, time\nrequest = json.load(sys.stdin)\n" + textwrap.dedent(body))
    return NvidiaSdkBackend(python=Path(sys.executable), bridge=bridge)


def test_pass_carries_the_sdk_steps(tmp_path: Path) -> None:
    backend = _fake_bridge(tmp_path, """
        assert request["nonce"] == "NONCE" and request["mode"] == "local"
        assert request["evidence_list"][0]["arch"] == "HOPPER"
        steps = {"GPU-0": {"x-nvidia-gpu-arch-check": True, "measres": "success"}}
        print(json.dumps({"ok": True, "claims": {}, "steps": steps, "error": None}))
    """.replace("NONCE", NONCE.hex()))  # fmt: skip
    check = backend.verify(PAYLOAD, NONCE)
    assert check.name == GPU_NVIDIA_SDK
    assert check.status is Status.PASS, check.detail
    assert "GPU-0: passed arch-check, measres" in check.detail


def test_rejection_is_a_failure_with_the_sdk_error(tmp_path: Path) -> None:
    backend = _fake_bridge(tmp_path, """
        steps = {"GPU-0": {"x-nvidia-gpu-arch-check": True, "x-nvidia-gpu-attestation-report-nonce-match": False}}
        print(json.dumps({"ok": False, "claims": {}, "steps": steps, "error": "nonce mismatch"}))
    """)  # fmt: skip
    check = backend.verify(PAYLOAD, NONCE)
    assert check.status is Status.FAIL
    assert "nv-attestation-sdk: nonce mismatch" in check.detail
    assert "not passed attestation-report-nonce-match" in check.detail


def test_unreachable_services_skip(tmp_path: Path) -> None:
    backend = _fake_bridge(tmp_path, """
        print(json.dumps({"ok": False, "unreachable": True, "error": "needs OCSP: unreachable"}))
    """)  # fmt: skip
    check = backend.verify(PAYLOAD, NONCE)
    assert check.status is Status.SKIP and check.required
    assert "needs OCSP: unreachable" in check.detail


def test_timeout_fails(tmp_path: Path) -> None:
    backend = _fake_bridge(tmp_path, "time.sleep(30)\n")
    check = backend.verify(PAYLOAD, NONCE, timeout_s=0.5)
    assert check.status is Status.FAIL
    assert "no answer in 0.5 s" in check.detail


@pytest.mark.parametrize(
    "body",
    [
        "print('SDK says hello')\n",
        "print(json.dumps({'ok': 'yes'}))\n",
        "print(json.dumps([1, 2]))\n",
        "sys.exit(3)\n",
    ],
)
def test_malformed_answer_fails(tmp_path: Path, body: str) -> None:
    check = _fake_bridge(tmp_path, body).verify(PAYLOAD, NONCE)
    assert check.status is Status.FAIL
    assert "no well-formed answer" in check.detail


def test_missing_venv_skips(tmp_path: Path) -> None:
    check = NvidiaSdkBackend(python=tmp_path / "nope" / "bin" / "python").verify(PAYLOAD, NONCE)
    assert check.status is Status.SKIP
    assert check.detail.startswith(NOT_INSTALLED)


def test_verifier_adds_the_check_only_when_asked(tmp_path: Path) -> None:
    node = SimulatedNode()
    nonce = bytes.fromhex("aa" * 32)
    policy = VerificationPolicy.build(allow_simulated=True, relax={"measurements"})
    plain = Verifier.production()
    assert GPU_NVIDIA_SDK not in plain.verify_report(node.report(nonce), policy, nonce=nonce).names()
    missing = replace(plain, nvidia_sdk=NvidiaSdkBackend(python=tmp_path / "python"))
    result = missing.verify_report(node.report(nonce), policy, nonce=nonce)
    assert result.check(GPU_NVIDIA_SDK).status is Status.SKIP
    assert not result.ok  # asked for and not run: it blocks, like any required skip
    assert [c.name for c in result.blocking] == [GPU_NVIDIA_SDK]


def test_cli_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nonce = bytes.fromhex("aa" * 32)
    report = tmp_path / "report.json"
    report.write_text(json.dumps(SimulatedNode().report(nonce)))
    argv = ["verify", "report", str(report), "--nonce", nonce.hex(), "--allow-simulated", "--json",
            "--gpu-backend", "nvidia-sdk", "--nvidia-sdk-python", str(tmp_path / "python")]  # fmt: skip
    assert cli_main(argv) == 1
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks[GPU_NVIDIA_SDK]["status"] == "skip"
    assert "run scripts/nvsdk-env.sh" in checks[GPU_NVIDIA_SDK]["detail"]


_UNREACHABLE = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|Max retries exceeded"
)


@pytest.mark.slow
def test_real_sdk_on_the_hopper_vector(vectors: Path) -> None:
    """Builds build/nvsdk-venv and runs the real bridge; offline the SDK stops at OCSP."""
    setup = subprocess.run(  # our own script
        [str(REPO / "scripts" / "nvsdk-env.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    if setup.returncode != 0:
        # Only a registry that cannot be reached excuses this test; any other failure (a broken
        # lock, say) must show.
        if _UNREACHABLE.search(setup.stderr):
            pytest.skip(f"cannot build the SDK venv (PyPI unreachable): {setup.stderr[-300:]}")
        pytest.fail(f"scripts/nvsdk-env.sh failed:\n{setup.stdout}\n{setup.stderr[-3000:]}")
    python = REPO / "build" / "nvsdk-venv" / "bin" / "python"
    nvidia = vectors / "nvidia"
    report = bytes.fromhex((nvidia / "hopperAttestationReport.txt").read_text().strip())
    chain = (nvidia / "hopperCertChain.txt").read_bytes()
    payload = NvidiaPayload(NONCE, (GpuEvidenceEntry(report, chain, "HOPPER"),))
    request = json.loads(payload.to_json()) | {"mode": "local", "network_timeout_s": 5}
    done = subprocess.run(  # the venv's python and our bridge
        [str(python), "-I", str(BRIDGE)], input=json.dumps(request), capture_output=True, text=True,
        timeout=180, check=False,
    )  # fmt: skip
    answer = json.loads(done.stdout)
    how_far = f"SDK answer: error={answer['error']!r} steps={answer['steps']} log={answer.get('log')}"
    assert isinstance(answer["ok"], bool) and isinstance(answer["claims"], dict), how_far
    steps = answer["steps"]["GPU-0"]
    # What the SDK establishes before it needs the network: its own parser reads the report, the
    # chain verifies to its bundled root and the leaf's FWID matches the report's.
    assert steps["x-nvidia-gpu-arch-check"] is True, how_far
    assert steps["x-nvidia-gpu-attestation-report-parsed"] is True, how_far
    assert steps["x-nvidia-gpu-attestation-report-cert-chain-fwid-match"] is True, how_far
    if answer["unreachable"]:
        # Offline it stops at the OCSP check of the device chain, before nonce, signature and RIMs.
        assert not answer["ok"], how_far
        assert "OCSP/RIM services: unreachable" in answer["error"], how_far
        check = NvidiaSdkBackend(python=python).verify(payload, NONCE)
        assert check.status is Status.SKIP and "unreachable" in check.detail, check.detail
    else:  # with NVIDIA's services in reach the nonce and signature checks run too
        assert steps["x-nvidia-gpu-attestation-report-nonce-match"] is True, how_far
        assert steps["x-nvidia-gpu-attestation-report-signature-verified"] is True, how_far
