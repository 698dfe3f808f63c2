"""gpu_binding: per-request GPU evidence must come from the devices the boot's ready gate recorded."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from support.servers import running
from tee_inference.attestation.eventlog import EVENT_GPU_GATE, load_event_log
from tee_inference.attestation.nvidia_certs import decode_certificate_chain
from tee_inference.attestation.nvidia_devices import device_identity
from tee_inference.attestation.nvidia_simulated import SimulatedGpu
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.middleware import SigningMiddleware
from tee_inference.verify.gpu_binding import GPU_BINDING, check_gpu_binding
from tee_inference.verify.results import Status

MODEL = "fake-model"


def _identities(vectors: Path, name: str) -> list[Any]:
    items = json.loads((vectors / "nvidia/attestation-sdk/serialized_test_evidence" / name).read_text())
    return [device_identity(decode_certificate_chain(base64.b64decode(i["certificate"]))) for i in items]


def _gate(identities: list[Any]) -> dict[str, Any]:
    devices = [{"index": n, "kind": "gpu", "arch": "HOPPER", "ueid": i.ueid,
                "identity_key_sha256": i.identity_key_sha256} for n, i in enumerate(identities)]  # fmt: skip
    return {"format": "tee-inference-gpu-gate/v1", "devices": devices, "ready_state": 1}


def test_real_devices_bound(vectors: Path) -> None:
    four = _identities(vectors, "multi_gpu_hopper.json")
    result = check_gpu_binding(_gate(four), four)
    assert result.status is Status.PASS and result.required and "exactly the 4" in result.detail


def test_missing_and_foreign_devices_fail(vectors: Path) -> None:
    four = _identities(vectors, "multi_gpu_hopper.json")
    other = device_identity(SimulatedGpu(b"\x99" * 32).certificates)
    missing = check_gpu_binding(_gate(four), four[:3])
    assert (
        missing.status is Status.FAIL
        and "1 device(s) attested at boot are not in the evidence" in missing.detail
    )
    foreign = check_gpu_binding(_gate(four[:3]), [*four[:3], other])
    assert foreign.status is Status.FAIL and f"ueid {other.ueid}) was not attested at boot" in foreign.detail


def test_a_device_twice_is_not_two(vectors: Path) -> None:
    four = _identities(vectors, "multi_gpu_hopper.json")
    (again,) = _identities(vectors, "hopper_evidence.json")  # NVIDIA's sample of one of the four
    assert again in four
    result = check_gpu_binding(_gate([*four[:3], again]), [*four[:3], again, again])
    assert result.status is Status.FAIL and "5 evidence entries for the 4 device(s)" in result.detail


def test_without_gate_event_is_a_visible_skip() -> None:
    result = check_gpu_binding(None, [])
    assert (
        result.status is Status.SKIP and not result.required and "no tee-inference:gpu-gate" in result.detail
    )
    assert check_gpu_binding({"devices": []}, []).status is Status.FAIL


def _verify(report: dict[str, Any], nonce: str, tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    done = subprocess.run(
        [sys.executable, "-m", "tee_inference", "verify", "report", str(path), "--nonce", nonce,
         "--allow-simulated", "--no-measurements", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = json.loads(done.stdout)
    return {c["name"]: c["status"] for c in out["checks"]} | {"ok": str(out["ok"])}


def test_gated_server_reports_are_bound(tmp_path: Path) -> None:
    """A simulated server with --gpu-ready-gate: its RTMR3 names its GPU; a swapped GPU is caught."""
    config = ServerConfig.build(served_models=(MODEL,), model_weights_root=FakeEngine.weights_root(),
                                gpu_ready_gate=True)  # fmt: skip
    with running(SigningMiddleware(FakeEngine(MODEL), services=boot(config))) as url:
        nonce = secrets.token_hex(32)
        report = httpx.get(url + "/v1/attestation/report", params={"nonce": nonce}).json()
    gate = [e for e in load_event_log(report["event_log"]) if e.event == EVENT_GPU_GATE]
    assert len(gate) == 1 and json.loads(gate[0].event_payload)["ready_state"] == 1
    statuses = _verify(report, nonce, tmp_path)
    assert statuses[GPU_BINDING] == "pass" and statuses["ok"] == "True"

    # The same report with another (validly signed, fresh) GPU's evidence in it.
    swapped = SimulatedGpu(b"\x99" * 32).payload(bytes.fromhex(nonce)).to_json()
    statuses = _verify({**report, "nvidia_payload": swapped}, nonce, tmp_path)
    assert (
        statuses["gpu_evidence"] == "pass" and statuses[GPU_BINDING] == "fail" and statuses["ok"] == "False"
    )


def test_ungated_server_says_so(tmp_path: Path) -> None:
    config = ServerConfig.build(served_models=(MODEL,), model_weights_root=FakeEngine.weights_root())
    with running(SigningMiddleware(FakeEngine(MODEL), services=boot(config))) as url:
        nonce = secrets.token_hex(32)
        report = httpx.get(url + "/v1/attestation/report", params={"nonce": nonce}).json()
    statuses = _verify(report, nonce, tmp_path)
    assert statuses[GPU_BINDING] == "skip" and statuses["ok"] == "True"
