"""The GPU ready gate on NVML fakes: attest every device locally, only then set the ready state.

The real NvmlGpuProvider runs against FakeNvml (tests/fakes/nvml.py, checked against nvidia-ml-py);
NVSwitch evidence comes from a fake ``nvattest`` executable that prints what ``nvattest
collect-evidence --format json`` prints. Real NVIDIA evidence (tests/data/vectors/nvidia) goes
through the same local attestation under NVIDIA's real root.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from fakes.nvml import FakeGpu, FakeNvml
from tee_inference.attestation.nvidia_devices import LS10
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload, decode_evidence
from tee_inference.attestation.nvidia_simulated import SimulatedGpu, simulated_hgx_board
from tee_inference.tee.gpu_gate import (
    GATE_FORMAT,
    GpuGateError,
    NvattestSwitchSource,
    attest_locally,
    parse_nvattest_evidence,
)
from tee_inference.tee.gpu_nvml import GpuEvidenceError, NvmlGpuProvider
from tee_inference.tee.gpu_simulated import SimulatedGpuProvider
from tee_inference.verify.trust import load_nvidia_root

BOARD_SEED = b"\x42" * 32


def gated(nvml: FakeNvml, **extra: Any) -> NvmlGpuProvider:
    # Simulated device chains end at their own SIMULATED roots: the gate is told to accept them
    # here, as `--tee simulated` is; the production wiring (boot.make_trust_roots) never does.
    root = nvml.gpus[0].sim.root_certificate if nvml.gpus else None
    return NvmlGpuProvider(nvml=nvml, ready_gate=True, nvidia_root=root, allow_simulated=True, **extra)


def by_name(results: list[Any]) -> dict[str, Any]:
    return {r.name: r for r in results}


def fake_nvattest(tmp_path: Path, *, seed: bytes = BOARD_SEED, result_code: int = 0) -> list[str]:
    """An executable that answers `collect-evidence --device nvswitch --format json --nonce HEX` as
    nvattest does, with the simulated board's four switches."""
    script = tmp_path / "nvattest"
    script.write_text(f"""
import base64, json, sys
from tee_inference.attestation.nvidia_simulated import simulated_hgx_board
args = sys.argv[1:]
assert args[:5] == ["collect-evidence", "--device", "nvswitch", "--format", "json"], args
nonce = bytes.fromhex(args[args.index("--nonce") + 1])
_, switches = simulated_hgx_board({seed!r})
print(json.dumps({{"evidences": [{{"evidence": base64.b64encode(s.evidence(nonce)).decode(),
    "certificate": base64.b64encode(s.certificate_chain_pem()).decode(), "arch": "LS10"}} for s in switches],
    "result_code": {result_code}, "result_message": "Ok" if {result_code} == 0 else "NSCQ error"}}))
""")
    return [sys.executable, str(script)]


# One GPU -----------------------------------------------------------------------------------------


def test_gate_attests_then_sets_ready() -> None:
    nvml = FakeNvml([FakeGpu(SimulatedGpu(b"\x01" * 32))], ready_state=0)
    provider = gated(nvml)
    results = provider.check()

    assert [r.detail for r in results if not r.ok] == []
    assert by_name(results)["gpu.ready-gate"].detail.startswith("1 GPU(s) attested locally for a fresh nonce")
    assert nvml.ready_sets == [1] and nvml.ready_state == 1
    # Evidence was taken before the ready state was set.
    calls = nvml.calls
    assert calls.index("nvmlDeviceGetConfComputeGpuAttestationReport") < calls.index(
        "nvmlSystemSetConfComputeGpusReadyState"
    )
    record = provider.gate_record()
    assert record is not None and record["format"] == GATE_FORMAT and record["ready_state"] == 1
    (device,) = record["devices"]
    assert device["kind"] == "gpu" and device["arch"] == "HOPPER"
    assert device["ueid"] == str(nvml.gpus[0].sim.certificates[0].serial_number)
    assert record["policy"]["multi_gpu_mode"] == "none" and "gpu_chain" in record["policy"]["checks"]
    assert nvml.refcount == 0


def test_gpu_that_fails_local_attestation_is_never_marked_ready() -> None:
    good, forged = SimulatedGpu(b"\x01" * 32), SimulatedGpu(b"\x02" * 32)
    nvml = FakeNvml([FakeGpu(good), FakeGpu(SimulatedGpu(b"\x03" * 32), signer=forged)], ready_state=0)
    provider = gated(nvml)
    gate = by_name(provider.check())["gpu.ready-gate"]

    assert not gate.ok
    assert "gpu_evidence" in gate.detail and "GPU 1" in gate.detail
    assert gate.detail.endswith("the GPUs' ready state was not set")
    assert "nvmlSystemSetConfComputeGpusReadyState" not in nvml.calls
    assert nvml.ready_state == 0 and provider.gate_record() is None


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({"devtools_mode": 1}, "devtools mode is on"),
        ({"cc_feature": 0}, "confidential computing is off"),
        ({"environment": 1}, "environment is SIM"),
    ],
)
def test_bad_state_never_attempts(state: dict[str, int], reason: str) -> None:
    nvml = FakeNvml([FakeGpu(SimulatedGpu(b"\x01" * 32))], ready_state=0, **state)
    gate = by_name(gated(nvml).check())["gpu.ready-gate"]
    assert not gate.ok and gate.detail.startswith("not attempted") and reason in gate.detail
    assert "nvmlSystemSetConfComputeGpusReadyState" not in nvml.calls


def test_without_gate_not_ready_still_refuses() -> None:
    nvml = FakeNvml([FakeGpu(SimulatedGpu(b"\x01" * 32))], ready_state=0)
    problems = [r.detail for r in NvmlGpuProvider(nvml=nvml).check() if not r.ok]
    assert problems == ["GPU 0: not ready (NVML ready state 0: not accepting work)"]
    assert "nvmlSystemSetConfComputeGpusReadyState" not in nvml.calls


def test_production_root_refuses_simulated_gpus() -> None:
    """Wired as boot does (NVIDIA's pinned root, no simulation): simulated chains never pass."""
    nvml = FakeNvml([FakeGpu(SimulatedGpu(b"\x01" * 32))], ready_state=0)
    gate = by_name(NvmlGpuProvider(nvml=nvml, ready_gate=True).check())["gpu.ready-gate"]
    assert not gate.ok and "a simulator" in gate.detail and nvml.ready_sets == []


# HGX: 8 GPUs and 4 NVSwitches in protected-PCIe mode ------------------------------------------------


def test_hgx_board_gate_with_switches(tmp_path: Path) -> None:
    gpus, _switches = simulated_hgx_board(BOARD_SEED)
    nvml = FakeNvml([FakeGpu(g) for g in gpus], ready_state=0, multi_gpu_mode=1)
    provider = gated(nvml, switches=NvattestSwitchSource(fake_nvattest(tmp_path)))
    gate = by_name(provider.check())["gpu.ready-gate"]

    assert gate.ok, gate.detail
    assert gate.detail.startswith("8 GPU(s) and 4 NVSwitch(es) attested") and "HGX topology" in gate.detail
    record = provider.gate_record()
    assert record is not None and [d["kind"] for d in record["devices"]] == ["gpu"] * 8 + ["nvswitch"] * 4
    assert (
        record["policy"]["multi_gpu_mode"] == "protected-pcie"
        and "gpu_topology" in record["policy"]["checks"]
    )
    # Every later report carries every device: 8 GPUs then 4 switches.
    payload = provider.evidence(b"\x07" * 32)
    assert [e.arch for e in payload.entries] == ["HOPPER"] * 8 + [LS10] * 4 and payload.arch == "HOPPER"


def test_hgx_board_with_a_gpu_missing_fails_topology(tmp_path: Path) -> None:
    gpus, _ = simulated_hgx_board(BOARD_SEED)
    nvml = FakeNvml([FakeGpu(g) for g in gpus[:7]], ready_state=0, multi_gpu_mode=1)
    gate = by_name(gated(nvml, switches=NvattestSwitchSource(fake_nvattest(tmp_path))).check())[
        "gpu.ready-gate"
    ]
    assert not gate.ok and "gpu_topology" in gate.detail and "7 GPU(s) and 4 NVSwitch(es)" in gate.detail
    assert nvml.ready_sets == []


def test_protected_pcie_without_switch_evidence_fails_closed(tmp_path: Path) -> None:
    gpus, _ = simulated_hgx_board(BOARD_SEED)
    nvml = FakeNvml([FakeGpu(g) for g in gpus], ready_state=0, multi_gpu_mode=1)
    gate = by_name(gated(nvml).check())["gpu.ready-gate"]
    assert not gate.ok and "no" in gate.detail and "NVSwitch evidence" in gate.detail
    with pytest.raises(GpuEvidenceError, match="protected-PCIe"):
        NvmlGpuProvider(nvml=nvml).evidence(b"\x07" * 32)
    failing = NvattestSwitchSource(fake_nvattest(tmp_path, result_code=3))
    gate = by_name(gated(nvml, switches=failing).check())["gpu.ready-gate"]
    assert not gate.ok and "NSCQ error" in gate.detail and nvml.ready_sets == []


def test_switches_from_another_board_fail_topology(tmp_path: Path) -> None:
    gpus, _ = simulated_hgx_board(BOARD_SEED)
    nvml = FakeNvml([FakeGpu(g) for g in gpus], ready_state=0, multi_gpu_mode=1)
    other = NvattestSwitchSource(fake_nvattest(tmp_path, seed=b"\x43" * 32))
    gate = by_name(gated(nvml, switches=other).check())["gpu.ready-gate"]
    assert not gate.ok and "none of the switches the GPUs see" in gate.detail


def test_parse_nvattest_output() -> None:
    with pytest.raises(GpuGateError, match="not the output"):
        parse_nvattest_evidence(b"not json")
    with pytest.raises(GpuGateError, match="says 'boom'"):
        parse_nvattest_evidence(b'{"evidences": [], "result_code": 1, "result_message": "boom"}')
    assert parse_nvattest_evidence(b'{"evidences": [], "result_code": 0}') == ()


def test_nvattest_missing() -> None:
    with pytest.raises(GpuGateError, match="did not run"):
        NvattestSwitchSource(["/nonexistent/nvattest"]).evidence(bytes(32))


# Real NVIDIA evidence ----------------------------------------------------------------------------


def _real(vectors: Path, name: str) -> tuple[tuple[GpuEvidenceEntry, ...], bytes]:
    items = json.loads((vectors / "nvidia/attestation-sdk/serialized_test_evidence" / name).read_text())
    entries = tuple(
        GpuEvidenceEntry(decode_evidence(i["evidence"]), base64.b64decode(i["certificate"]), i["arch"])
        for i in items
    )
    return entries, bytes.fromhex(items[0]["nonce"])


def test_real_multi_gpu_evidence_passes_the_gate_checks(vectors: Path) -> None:
    """NVIDIA's 4-GPU sample, under NVIDIA's real root: four distinct devices, each recorded."""
    entries, nonce = _real(vectors, "multi_gpu_hopper.json")
    record = attest_locally(NvidiaPayload(nonce, entries), nonce, load_nvidia_root(), expect_switches=False)
    assert record.gpus == 4 and len({d["ueid"] for d in record.devices}) == 4
    assert record.devices[0]["ueid"] == "655333107904478077882826344426270545524203067314"


def test_real_evidence_refused_for_another_nonce(vectors: Path) -> None:
    entries, _nonce = _real(vectors, "multi_gpu_hopper.json")
    with pytest.raises(GpuGateError, match="gpu_nonce"):
        attest_locally(
            NvidiaPayload(bytes(32), entries), bytes(32), load_nvidia_root(), expect_switches=False
        )


def test_real_switch_copies_and_topology_refused(vectors: Path) -> None:
    """The 4 real GPUs with one real switch four times: not distinct, and no HGX board."""
    gpus, nonce = _real(vectors, "multi_gpu_hopper.json")
    switches, _ = _real(vectors, "multi_switch_ls10.json")
    payload = NvidiaPayload(nonce, (*gpus, *switches))
    with pytest.raises(GpuGateError) as refused:
        attest_locally(payload, nonce, load_nvidia_root(), expect_switches=True)
    assert "gpu_distinct" in str(refused.value) and "gpu_topology" in str(refused.value)


# Simulated ---------------------------------------------------------------------------------------


def test_simulated_provider_gate() -> None:
    provider = SimulatedGpuProvider(bytes(32), gpu_count=2, ready_gate=True)
    assert provider.gate_record() is None
    (check,) = provider.check()
    assert check.ok and check.name == "gpu.ready-gate"
    record = provider.gate_record()
    assert (
        record is not None and len(record["devices"]) == 2 and record["policy"]["environment"] == "SIMULATED"
    )
    assert SimulatedGpuProvider().gate_record() is None
