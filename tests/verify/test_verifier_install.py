"""A gateway or auditor installs the verifier alone: no web server, no GPU library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import REPO
from support.simulated_report import SimulatedNode

SERVER_ONLY = ("fastapi", "starlette", "uvicorn", "prometheus-client", "nvidia-ml-py", "vllm")


@pytest.mark.slow
def test_core_install_verifies_a_report_without_server_packages(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    lock = [*pip, "--require-hashes", "-r", str(REPO / "requirements" / "build.txt")]
    subprocess.run([*lock, "-r", str(REPO / "requirements" / "verifier.txt")], check=True, timeout=600)
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", str(REPO)], check=True, timeout=600)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    names = {p["name"].lower() for p in json.loads(installed)}
    assert not names & set(SERVER_ONLY), names & set(SERVER_ONLY)

    node, nonce = SimulatedNode(), bytes(range(32))
    (tmp_path / "report.json").write_text(json.dumps(node.report(nonce)))
    (tmp_path / "expected.json").write_text(json.dumps(node.expected_measurements()))
    done = subprocess.run(
        [str(venv / "bin" / "tee-inference"), "verify", "report", str(tmp_path / "report.json"), "--nonce",
         nonce.hex(), "--expect", str(tmp_path / "expected.json"), "--allow-simulated", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["ok"] is True
    serve = subprocess.run(
        [str(venv / "bin" / "tee-inference"), "serve", "--engine", "fake"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert serve.returncode == 2 and "pip install 'tee-inference[server]'" in serve.stderr
