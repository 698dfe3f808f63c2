"""GPU evidence checks on real Hopper, Blackwell and NVSwitch evidence and on the simulated devices."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tee_inference.attestation.nvidia_certs import load_nvidia_root
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload, decode_evidence
from tee_inference.attestation.nvidia_simulated import SimulatedGpu, SimulatedSwitch, simulated_hgx_board
from tee_inference.exceptions import VerificationError
from tee_inference.verify import Status, VerificationPolicy
from tee_inference.verify.gpu import GpuChecks, check_gpu
from tee_inference.verify.policy import GpuPolicy
from tee_inference.verify.results import CheckResult

NEARAI_NONCE = bytes.fromhex("89d36f654c47ef2bb6ed989c9655ea19548a9057a97ef4e0b7ad54dfcf5e6b00")
HOPPER_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")


def _statuses(checks: tuple[CheckResult, ...]) -> dict[str, Status]:
    return {c.name: c.status for c in checks}


OFFLINE_SKIPS = {"gpu_topology", "gpu_rim", "gpu_ocsp"}  # no switches, no RIMs, no OCSP client


def _passes(result: GpuChecks, skipped: set[str] = OFFLINE_SKIPS) -> bool:
    """Every check passed but the informational skips named: the verdict a caller would get."""
    statuses = _statuses(result.checks)
    assert {n for n, s in statuses.items() if s is Status.SKIP} == skipped, statuses
    assert all(not c.required for c in result.checks if c.status is Status.SKIP)
    return {s for n, s in statuses.items() if n not in skipped} == {Status.PASS}


@pytest.fixture(scope="module")
def nearai(vectors: Path) -> str:
    return json.dumps(json.loads((vectors / "nvidia/nearai_nvidia_payload.json").read_text()))


@pytest.fixture(scope="module")
def hopper(vectors: Path) -> NvidiaPayload:
    evidence = bytes.fromhex((vectors / "nvidia/hopperAttestationReport.txt").read_text().strip())
    chain = (vectors / "nvidia/hopperCertChain.txt").read_bytes()
    return NvidiaPayload(HOPPER_NONCE, (GpuEvidenceEntry(evidence, chain),))


def test_nearai_payload_verifies_offline(nearai: str) -> None:
    result = check_gpu(nearai, NEARAI_NONCE, VerificationPolicy(), nvidia_root=load_nvidia_root())
    assert _passes(result)
    details = " ".join(c.detail for c in result.checks)
    assert "NVIDIA Device Identity CA (sha256 102bf659d5419614" in details
    assert "driver 550.135" in details
    assert not result.simulated


def test_hopper_sample_verifies(hopper: NvidiaPayload) -> None:
    result = check_gpu(hopper.to_json(), HOPPER_NONCE, VerificationPolicy(), nvidia_root=load_nvidia_root())
    assert _passes(result)
    assert "driver 550.90.07, VBIOS 96.00.9F.00.01" in result.checks[1].detail


def test_wrong_nonce_is_reported(nearai: str) -> None:
    other = bytes(32)
    result = check_gpu(nearai, other, VerificationPolicy(), nvidia_root=load_nvidia_root())
    statuses = _statuses(result.checks)
    assert statuses["gpu_nonce"] is Status.FAIL
    assert statuses["gpu_evidence"] is Status.PASS
    assert NEARAI_NONCE.hex() in result.checks[2].detail


@pytest.mark.parametrize("offset", [4, 40, 200, 2000, -200, -1])
def test_evidence_byte_tamper_is_detected(hopper: NvidiaPayload, offset: int) -> None:
    entry = hopper.entries[0]
    evidence = bytearray(entry.evidence)
    evidence[offset] ^= 0x01
    payload = NvidiaPayload(HOPPER_NONCE, (GpuEvidenceEntry(bytes(evidence), entry.certificate_chain_pem),))
    result = check_gpu(payload.to_json(), HOPPER_NONCE, VerificationPolicy(), nvidia_root=load_nvidia_root())
    statuses = _statuses(result.checks)
    assert Status.FAIL in (statuses["gpu_evidence"], statuses["gpu_nonce"])
    if 4 <= offset < 36:  # the request nonce itself: both the nonce and the signature fail
        assert statuses["gpu_nonce"] is Status.FAIL
    assert statuses["gpu_evidence"] is Status.FAIL


def test_chain_to_another_root_fails(hopper: NvidiaPayload) -> None:
    other_root = SimulatedGpu(bytes(32)).root_certificate
    # The real chain ends at NVIDIA's root, which is not this anchor.
    result = check_gpu(hopper.to_json(), HOPPER_NONCE, VerificationPolicy(), nvidia_root=other_root)
    assert _statuses(result.checks)["gpu_chain"] is Status.FAIL
    assert "does not end at the trust anchor" in result.checks[0].detail
    assert "evidence signature not checked" in result.checks[1].detail


def test_certificate_tamper_is_detected(hopper: NvidiaPayload) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509 import load_pem_x509_certificates

    entry = hopper.entries[0]
    certs = load_pem_x509_certificates(entry.certificate_chain_pem)
    der = bytearray(certs[1].public_bytes(Encoding.DER))
    der[-10] ^= 0x01  # inside the signature of the second certificate
    import base64

    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(der)) + b"-----END CERTIFICATE-----\n"
    chain = b"".join(pem if i == 1 else c.public_bytes(Encoding.PEM) for i, c in enumerate(certs))
    payload = NvidiaPayload(HOPPER_NONCE, (GpuEvidenceEntry(entry.evidence, chain),))
    result = check_gpu(payload.to_json(), HOPPER_NONCE, VerificationPolicy(), nvidia_root=load_nvidia_root())
    assert _statuses(result.checks)["gpu_chain"] is Status.FAIL
    assert "GPU 0: certificate 1" in result.checks[0].detail


def test_simulated_gpu_needs_permission() -> None:
    nonce = bytes(range(32))
    payload = SimulatedGpu(bytes(32)).payload(nonce).to_json()
    refused = check_gpu(payload, nonce, VerificationPolicy(), nvidia_root=load_nvidia_root())
    assert _statuses(refused.checks)["gpu_chain"] is Status.FAIL
    assert "--allow-simulated" in refused.checks[0].detail
    allowed = check_gpu(
        payload, nonce, VerificationPolicy.build(allow_simulated=True), nvidia_root=load_nvidia_root()
    )
    assert _passes(allowed)
    assert allowed.simulated


def test_missing_payload_fails_unless_gpu_not_required() -> None:
    root = load_nvidia_root()
    assert check_gpu(None, bytes(32), VerificationPolicy(), nvidia_root=root).checks[0].status is Status.FAIL
    relaxed = check_gpu(None, bytes(32), VerificationPolicy(require_gpu=False), nvidia_root=root)
    assert all(c.status is Status.SKIP and not c.required for c in relaxed.checks)


def test_malformed_payload_fails_with_reason() -> None:
    result = check_gpu('{"arch": "HOPPER"}', bytes(32), VerificationPolicy(), nvidia_root=load_nvidia_root())
    assert _statuses(result.checks)["gpu_evidence"] is Status.FAIL
    assert "nonce" in result.checks[1].detail


# Distinct devices, architectures, NVSwitches -------------------------------------------------------

SWITCH_NONCE = HOPPER_NONCE  # NVIDIA's switch samples answer the same nonce as the nvtrust GPU sample
SDK_GPU_NONCE = bytes.fromhex("e97b23a1718095a0e9e35edca810768c70a6a5a389b705e753b197912bc11576")


def _sdk_payload(vectors: Path, name: str, arch: str | None = None) -> tuple[NvidiaPayload, bytes]:
    """NVIDIA's serialized evidence list (``[{arch, nonce, evidence, certificate}]``) as our payload."""
    items = json.loads((vectors / "nvidia/attestation-sdk/serialized_test_evidence" / name).read_text())
    nonce = bytes.fromhex(items[0]["nonce"])
    entries = tuple(
        GpuEvidenceEntry(
            decode_evidence(i["evidence"]), base64.b64decode(i["certificate"]), arch or i["arch"]
        )
        for i in items
    )
    return NvidiaPayload(nonce, entries, arch or items[0]["arch"]), nonce


def _check(payload: NvidiaPayload, nonce: bytes, policy: VerificationPolicy | None = None) -> GpuChecks:
    return check_gpu(payload.to_json(), nonce, policy or VerificationPolicy(), nvidia_root=load_nvidia_root())


def _detail(result: GpuChecks, name: str) -> str:
    return next(c.detail for c in result.checks if c.name == name)


def test_eight_copies_of_one_gpu_are_one_gpu(hopper: NvidiaPayload) -> None:
    # Before gpu_distinct, this payload passed every check as eight GPUs.
    copies = NvidiaPayload(HOPPER_NONCE, hopper.entries * 8)
    result = _check(copies, HOPPER_NONCE)
    statuses = _statuses(result.checks)
    assert statuses["gpu_chain"] is statuses["gpu_evidence"] is statuses["gpu_nonce"] is Status.PASS
    assert statuses["gpu_distinct"] is Status.FAIL
    ueid = result.identities[0].ueid
    assert _detail(result, "gpu_distinct").startswith(f"GPU 1 is the same device as GPU 0 (ueid {ueid})")
    assert _detail(result, "gpu_distinct").count("same device as GPU 0") == 7
    assert len(set(result.devices)) == 1 and len(result.devices) == 8


def test_nvidia_multi_gpu_sample_is_four_devices(vectors: Path) -> None:
    payload, nonce = _sdk_payload(vectors, "multi_gpu_hopper.json")
    assert nonce == SDK_GPU_NONCE
    result = _check(payload, nonce)
    assert _passes(result)
    assert (
        _detail(result, "gpu_distinct") == "4 distinct device(s) by leaf serial (ueid) and BROM identity key"
    )
    assert len(set(result.devices)) == 4
    assert result.devices[0].startswith("ueid 655333107904478077882826344426270545524203067314, identity key")
    assert "driver 590.12, VBIOS 96.00.A5.00.01" in _detail(result, "gpu_evidence")


def test_nvidia_multi_switch_sample_is_one_switch_four_times(vectors: Path) -> None:
    payload, nonce = _sdk_payload(vectors, "multi_switch_ls10.json")
    result = _check(payload, nonce)
    assert _statuses(result.checks)["gpu_evidence"] is Status.PASS
    assert _statuses(result.checks)["gpu_distinct"] is Status.FAIL
    assert "NVSwitch 3 is the same device as NVSwitch 0" in _detail(result, "gpu_distinct")


def test_switch_evidence_is_verified_like_a_gpus(vectors: Path) -> None:
    # Before: gpu_evidence failed with "opaque data driver version (field 3) … missing".
    payload, nonce = _sdk_payload(vectors, "switch_evidence_ls10.json")
    assert (nonce, payload.arch) == (SWITCH_NONCE, "LS10")
    result = _check(payload, nonce)
    statuses = _statuses(result.checks)
    for name in ("gpu_chain", "gpu_evidence", "gpu_nonce", "gpu_distinct", "gpu_arch"):
        assert statuses[name] is Status.PASS, (name, _detail(result, name))
    assert "NVSwitch 0: VBIOS 96.10.55.00.01" in _detail(result, "gpu_evidence")
    assert "NVIDIA Device Identity CA (sha256 102bf659d5419614" in _detail(result, "gpu_chain")
    assert _detail(result, "gpu_arch").startswith("1 × LS10 (LS_10 chain)")
    # One switch without its GPUs is no HGX board.
    assert statuses["gpu_topology"] is Status.FAIL
    assert "0 GPU(s) and 1 NVSwitch(es)" in _detail(result, "gpu_topology")
    # A tampered switch report fails its signature.
    entry = payload.entries[0]
    raw = bytearray(entry.evidence)
    raw[100] ^= 1
    tampered = NvidiaPayload(
        nonce, (GpuEvidenceEntry(bytes(raw), entry.certificate_chain_pem, "LS10"),), "LS10"
    )
    assert "NVSwitch 0: GPU evidence signature does not verify" in _detail(
        _check(tampered, nonce), "gpu_evidence"
    )


@pytest.mark.parametrize(
    ("entry_arch", "payload_arch", "message"),
    [
        (
            "AMPERE",
            "AMPERE",
            "payload arch 'AMPERE' is no known NVIDIA CC architecture (known: BLACKWELL, HOPPER, LS10)",
        ),
        ("hopper", "HOPPER", "GPU 0: arch 'hopper' is no known"),
        ("BLACKWELL", "HOPPER", "GPU 0: arch BLACKWELL, but its chain is a GH100 (HOPPER)"),
        ("LS10", "HOPPER", "GPU 0: arch LS10, but its chain is a GH100 (HOPPER)"),
    ],
)
def test_arch_must_be_known_and_match_the_chain(
    hopper: NvidiaPayload, entry_arch: str, payload_arch: str, message: str
) -> None:
    # Before gpu_arch, any arch string passed unread.
    entry = hopper.entries[0]
    payload = NvidiaPayload(
        HOPPER_NONCE,
        (GpuEvidenceEntry(entry.evidence, entry.certificate_chain_pem, entry_arch),),
        payload_arch,
    )
    result = _check(payload, HOPPER_NONCE)
    assert _statuses(result.checks)["gpu_arch"] is Status.FAIL
    assert message in _detail(result, "gpu_arch")


def test_real_blackwell_and_the_allow_list(vectors: Path) -> None:
    base = vectors / "nvidia/attestation-sdk/testdata/sample_attestation_data/gpu"
    evidence = bytes.fromhex((base / "blackwellAttestationReport.txt").read_text().strip())
    entry = GpuEvidenceEntry(evidence, (base / "blackwellCertChain.txt").read_bytes(), "BLACKWELL")
    payload = NvidiaPayload(SWITCH_NONCE, (entry,), "BLACKWELL")
    result = _check(payload, SWITCH_NONCE)
    assert _passes(result)
    assert _detail(result, "gpu_arch") == "1 × BLACKWELL (GB100 chain); allowed: BLACKWELL, HOPPER, LS10"
    hopper_only = VerificationPolicy(gpu=GpuPolicy(arches=frozenset({"HOPPER"})))
    refused = _check(payload, SWITCH_NONCE, hopper_only)
    assert "payload arch BLACKWELL is not allowed by the policy (allowed: HOPPER, LS10)" in _detail(
        refused, "gpu_arch"
    )
    mislabelled = NvidiaPayload(
        SWITCH_NONCE, (GpuEvidenceEntry(entry.evidence, entry.certificate_chain_pem, "HOPPER"),)
    )
    assert "GPU 0: arch HOPPER, but its chain is a GB100 (BLACKWELL)" in _detail(
        _check(mislabelled, SWITCH_NONCE), "gpu_arch"
    )


def test_gpu_policy_refuses_unknown_arches() -> None:
    with pytest.raises(VerificationError, match="unknown NVIDIA architecture"):
        GpuPolicy(arches=frozenset({"AMPERE"}))
    with pytest.raises(VerificationError, match="switch_arches"):
        GpuPolicy(arches=frozenset({"LS10"}))


@pytest.fixture(scope="module")
def board() -> tuple[NvidiaPayload, tuple[SimulatedGpu, ...], tuple[SimulatedSwitch, ...]]:
    gpus, switches = simulated_hgx_board(bytes(32))
    nonce = bytes(range(32))
    entries = tuple(d.entry(nonce) for d in (*gpus, *switches))
    return NvidiaPayload(nonce, entries), gpus, switches


def test_simulated_hgx_board_passes(board: tuple[NvidiaPayload, Any, Any]) -> None:
    payload = board[0]
    assert [e.arch for e in payload.entries] == ["HOPPER"] * 8 + ["LS10"] * 4
    assert json.loads(payload.to_json())["arch"] == "HOPPER"
    result = _check(payload, payload.nonce, VerificationPolicy.build(allow_simulated=True))
    assert _passes(result, {"gpu_rim", "gpu_ocsp"})
    assert _detail(result, "gpu_topology").startswith("8 GPUs and 4 NVSwitches form one HGX board")
    assert _detail(result, "gpu_arch").startswith("8 × HOPPER (GH100 chain), 4 × LS10 (LS_10 chain)")
    assert result.simulated and len(set(result.devices)) == 12
    assert result.gpus[8] == "NVSwitch 8: VBIOS 96.10.55.00.01"


def test_hgx_board_with_a_switch_twice_or_missing_fails(board: tuple[NvidiaPayload, Any, Any]) -> None:
    payload = board[0]
    policy = VerificationPolicy.build(allow_simulated=True)
    twice = NvidiaPayload(payload.nonce, (*payload.entries[:11], payload.entries[8]))
    result = _check(twice, payload.nonce, policy)
    assert "NVSwitch 11: PDI" in _detail(
        result, "gpu_topology"
    ) and "already reported by NVSwitch 8" in _detail(result, "gpu_topology")
    assert "NVSwitch 11 is the same device as NVSwitch 8" in _detail(result, "gpu_distinct")
    short = _check(NvidiaPayload(payload.nonce, payload.entries[1:]), payload.nonce, policy)
    assert _detail(short, "gpu_topology").startswith("7 GPU(s) and 4 NVSwitch(es)")
    # Refused simulated chains leave nothing verified to build the board from.
    refused = _check(payload, payload.nonce)
    assert "GPU 0: report not verified, so not used" in _detail(refused, "gpu_topology")
