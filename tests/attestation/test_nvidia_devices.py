"""NVSwitch reports, device identities and HGX topology, on NVIDIA's published evidence and the simulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tee_inference.attestation.nvidia_certs import (
    certificate_fwid,
    decode_certificate_chain,
    load_nvidia_root,
    verify_certificate_chain,
)
from tee_inference.attestation.nvidia_devices import (
    chain_arch,
    chain_chip,
    device_identity,
    duplicate_devices,
    gpus_seen_by_switch,
    switch_pdi,
    switches_seen_by_gpu,
    topology_problems,
)
from tee_inference.attestation.nvidia_payload import decode_evidence
from tee_inference.attestation.nvidia_simulated import SimulatedGpu, SimulatedSwitch, simulated_hgx_board
from tee_inference.attestation.nvidia_spdm import (
    OPAQUE_FIELD_FWID,
    GpuEvidence,
    GpuEvidenceFormatError,
    parse_gpu_evidence,
    verify_evidence_nonce,
    verify_evidence_signature,
)

SWITCH_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
# What the four GPUs of multi_gpu_hopper.json see on their NVLinks (byte-reversed field 22).
SDK_SWITCHES = frozenset({"3a53b743d811e977", "9ae3beba9e673275", "03dba23b3c11bd8a", "666e93e19dec7d2d"})


def _serialized(vectors: Path, name: str) -> list[tuple[GpuEvidence, list[x509.Certificate], dict[str, Any]]]:
    items = json.loads((vectors / "nvidia/attestation-sdk/serialized_test_evidence" / name).read_text())
    return [
        (parse_gpu_evidence(decode_evidence(i["evidence"])), decode_certificate_chain(i["certificate"]), i)
        for i in items
    ]


def _labelled(items: list[tuple[GpuEvidence, Any, Any]], kind: str) -> list[tuple[str, GpuEvidence]]:
    return [(f"{kind} {n}", evidence) for n, (evidence, _, _) in enumerate(items)]


def test_switch_report_parses_and_verifies(vectors: Path) -> None:
    # Before: "opaque data driver version (field 3) … missing" and an 8-byte VBIOS demand.
    ((evidence, chain, item),) = _serialized(vectors, "switch_evidence_ls10.json")
    assert item["arch"] == "LS10"
    assert evidence.driver_version is None
    assert evidence.vbios_version == "96.10.55.00.01"
    assert len(evidence.measurements) == 31
    assert [c.subject.rfc4514_string().split(",")[0] for c in chain] == [
        "CN=LS_10 A01 FSP FMC LF", "CN=LS_10 A01 FSP BROM", "C=US",
        "O=NVIDIA Corporation", "O=NVIDIA",
    ]  # fmt: skip
    verify_certificate_chain(chain, load_nvidia_root())
    verify_evidence_signature(evidence, chain[0])
    verify_evidence_nonce(evidence, SWITCH_NONCE)
    assert evidence.opaque_field(OPAQUE_FIELD_FWID) is None and certificate_fwid(chain[0]) is not None
    assert chain_chip(chain) == "LS_10" and chain_arch(chain) == "LS10"
    assert switch_pdi(evidence) == "203eb31ad9ed0008"
    # The switch's BROM certificate carries its PDI in its subject serialNumber (50 ‖ PDI).
    assert "2.5.4.5=50203EB31AD9ED0008" in chain[1].subject.rfc4514_string()
    served = gpus_seen_by_switch(evidence)
    assert served is not None and len(served) == 7  # one of the 8 GPU slots repeats a PDI


def test_switch_vbios_text_must_have_the_dotted_form(vectors: Path) -> None:
    ((evidence, _, _),) = _serialized(vectors, "switch_evidence_ls10.json")
    raw = evidence.raw.replace(b"96.10.55.00.01", b"96.10.55.00:01")
    with pytest.raises(GpuEvidenceFormatError, match="VBIOS version must look like"):
        parse_gpu_evidence(raw)


def test_real_gpus_see_four_switches(vectors: Path) -> None:
    gpus = _serialized(vectors, "multi_gpu_hopper.json")
    assert len(gpus) == 4
    for evidence, chain, _ in gpus:
        assert switches_seen_by_gpu(evidence) == SDK_SWITCHES
        assert chain_arch(chain) == "HOPPER" and chain_chip(chain) == "GH100"
    # The two sample files are not one board: the switch is none the GPUs see, and counts are short.
    switch = _serialized(vectors, "switch_evidence_ls10.json")
    problems = topology_problems(_labelled(gpus, "GPU"), _labelled(switch, "NVSwitch"))
    assert problems[0] == "4 GPU(s) and 1 NVSwitch(es); an HGX board is 8 GPUs and 4 NVSwitches"
    assert "NVSwitch 0: PDI 203eb31ad9ed0008 is none of the switches the GPUs see" in problems
    assert "NVSwitch 0 serves 7 distinct GPUs, not 8" in problems


def test_real_identities(vectors: Path) -> None:
    distinct = [device_identity(chain) for _, chain, _ in _serialized(vectors, "multi_gpu_hopper.json")]
    assert duplicate_devices((f"GPU {n}", i) for n, i in enumerate(distinct)) == []
    (hopper,) = [device_identity(chain) for _, chain, _ in _serialized(vectors, "hopper_evidence.json")]
    assert hopper == distinct[0]
    assert hopper.ueid == "655333107904478077882826344426270545524203067314"  # leaf serial, decimal
    assert hopper.identity_key_sha256 is not None and hopper.identity_key_sha256.startswith(
        "150801ca5b7357da"
    )
    # multi_switch_ls10.json is one switch's evidence four times.
    copies = [device_identity(chain) for _, chain, _ in _serialized(vectors, "multi_switch_ls10.json")]
    problems = duplicate_devices((f"NVSwitch {n}", i) for n, i in enumerate(copies))
    assert problems == [
        f"NVSwitch {n} is the same device as NVSwitch 0 (ueid {copies[0].ueid})" for n in (1, 2, 3)
    ]


def test_identity_key_alone_reveals_a_copy() -> None:
    gpu = SimulatedGpu(bytes(32))
    identity = device_identity(gpu.certificates)
    other_leaf = device_identity((SimulatedGpu(b"\x01" * 32).certificates[0], *gpu.certificates[1:]))
    assert other_leaf.ueid != identity.ueid
    (problem,) = duplicate_devices([("GPU 0", identity), ("GPU 1", other_leaf)])
    assert problem.startswith("GPU 1 is the same device as GPU 0 (identity key sha256 ")
    with pytest.raises(ValueError, match="empty"):
        device_identity([])


def test_blackwell_chain_names_blackwell(vectors: Path) -> None:
    chain = decode_certificate_chain(
        (
            vectors / "nvidia/attestation-sdk/testdata/sample_attestation_data/gpu/blackwellCertChain.txt"
        ).read_bytes()
    )
    assert (chain_chip(chain), chain_arch(chain)) == ("GB100", "BLACKWELL")
    assert chain_arch(SimulatedGpu(bytes(32), chip="GB100").certificates) == "BLACKWELL"
    assert chain_arch([]) is None


def test_simulated_board_is_one_hgx_board() -> None:
    gpus, switches = simulated_hgx_board(bytes(32))
    nonce = bytes(range(32))
    parsed_gpus = [(f"GPU {n}", parse_gpu_evidence(g.evidence(nonce))) for n, g in enumerate(gpus)]
    parsed_switches = [
        (f"NVSwitch {n}", parse_gpu_evidence(s.evidence(nonce))) for n, s in enumerate(switches)
    ]
    assert topology_problems(parsed_gpus, parsed_switches) == []
    assert {switch_pdi(e) for _, e in parsed_switches} == switches_seen_by_gpu(parsed_gpus[0][1])
    for switch, (_, evidence) in zip(switches, parsed_switches, strict=True):
        verify_evidence_signature(evidence, switch.certificates[0])
        assert chain_arch(switch.certificates) == "LS10" == switch.arch
        assert evidence.driver_version is None and evidence.vbios_version == "96.10.55.00.01"
    # A switch reported twice, a GPU wired elsewhere, a switch serving other GPUs:
    twice = topology_problems(parsed_gpus, [*parsed_switches[:3], ("NVSwitch 4", parsed_switches[0][1])])
    assert any("already reported by NVSwitch 0" in p for p in twice)
    stray = SimulatedGpu(bytes(32), switch_pdis=[b"\x09" * 8] * 4)
    wired_elsewhere = topology_problems(
        [*parsed_gpus[:7], ("GPU 7", parse_gpu_evidence(stray.evidence(nonce)))], parsed_switches
    )
    assert wired_elsewhere == ["GPU 7 sees 1 distinct switches, not 4"]
    other = SimulatedSwitch(bytes(32), pdi=switches[3].pdi, gpu_pdis=[bytes([n]) * 8 for n in range(1, 9)])
    assert topology_problems(
        parsed_gpus, [*parsed_switches[:3], ("NVSwitch 3", parse_gpu_evidence(other.evidence(nonce)))]
    ) == ["NVSwitch 3 serves other GPUs than NVSwitch 0"]
