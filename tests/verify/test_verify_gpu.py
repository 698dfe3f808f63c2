"""GPU evidence checks on real Hopper evidence and on the simulated GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tee_inference.attestation.nvidia_certs import load_nvidia_root
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload
from tee_inference.attestation.nvidia_simulated import SimulatedGpu
from tee_inference.verify import Status, VerificationPolicy
from tee_inference.verify.gpu import check_gpu

NEARAI_NONCE = bytes.fromhex("89d36f654c47ef2bb6ed989c9655ea19548a9057a97ef4e0b7ad54dfcf5e6b00")
HOPPER_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")


def _statuses(checks: tuple[object, ...]) -> dict[str, Status]:
    return {c.name: c.status for c in checks}  # type: ignore[attr-defined]


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
    assert set(_statuses(result.checks).values()) == {Status.PASS}
    details = " ".join(c.detail for c in result.checks)
    assert "NVIDIA Device Identity CA (sha256 102bf659d5419614" in details
    assert "driver 550.135" in details
    assert not result.simulated


def test_hopper_sample_verifies(hopper: NvidiaPayload) -> None:
    result = check_gpu(hopper.to_json(), HOPPER_NONCE, VerificationPolicy(), nvidia_root=load_nvidia_root())
    assert set(_statuses(result.checks).values()) == {Status.PASS}
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
    assert set(_statuses(allowed.checks).values()) == {Status.PASS}
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
