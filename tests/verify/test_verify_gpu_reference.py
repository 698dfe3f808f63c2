"""``gpu_rim`` and ``gpu_ocsp`` through ``check_gpu``: NVIDIA's real RIMs, the simulator, fake services."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from fakes.ocsp_responder import FakeOcspResponder
from tee_inference.attestation.nvidia_certs import load_nvidia_root
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload, decode_evidence
from tee_inference.attestation.nvidia_rim import parse_rim
from tee_inference.attestation.nvidia_simulated import SimulatedGpu
from tee_inference.attestation.nvidia_simulated_rim import SimulatedRimSigner, rim_measurements
from tee_inference.exceptions import VerificationError
from tee_inference.verify import Status, VerificationPolicy
from tee_inference.verify.gpu import GpuChecks, check_gpu
from tee_inference.verify.policy import GpuPolicy

TODAY = datetime(2026, 11, 29, 12, tzinfo=UTC)
IN_2025 = datetime(2025, 3, 1, tzinfo=UTC)  # NVIDIA's VBIOS RIM signer was valid then
NONCE = bytes(range(32))
SDK = "nvidia/attestation-sdk/testdata/"
DRIVER_RIM = SDK + "NV_GPU_DRIVER_GH100_550.144.03.xml"
VBIOS_RIM = "nvidia/1010_0200_882_96005E0001_PROD.swidtag"
VBIOS_MISMATCH_RIM = SDK + "sample_rims/NV_GPU_VBIOS_1010_0200_882_96005E0001_measurement_mismatch.xml"
SWITCH_RIM = SDK + "switchVBIOSRim_NV_SWITCH_BIOS_5612_0002_890_9610550001.xml"
SIMULATED = VerificationPolicy.build(allow_simulated=True)


def _check(
    payload: NvidiaPayload, nonce: bytes = NONCE, policy: VerificationPolicy = SIMULATED, **kwargs: object
) -> GpuChecks:
    return check_gpu(payload.to_json(), nonce, policy, nvidia_root=load_nvidia_root(), **kwargs)  # type: ignore[arg-type]


def _result(result: GpuChecks, name: str) -> tuple[Status, str, bool]:
    check = next(c for c in result.checks if c.name == name)
    return check.status, check.detail, check.required


@pytest.fixture(scope="module")
def twin(vectors: Path) -> SimulatedGpu:
    """A simulated H100 that answers with the measurements NVIDIA's real RIMs state.

    No public report has a driver RIM to match, so the report is made from the RIMs: the
    550.144.03 driver RIM and the 96.00.5E.00.01 VBIOS RIM of board 1010/0200/882. Golden index
    ``i`` is block ``i + 1``; where the driver RIM offers alternatives, the last one is used.
    """
    driver = parse_rim((vectors / DRIVER_RIM).read_bytes())
    vbios = parse_rim((vectors / VBIOS_RIM).read_bytes())
    blocks = {i + 1: m.alternatives[-1] for rim in (driver, vbios) for i, m in rim.active.items()}
    return SimulatedGpu(
        bytes(32), driver_version="550.144.03", vbios_version="96.00.5E.00.01",
        project="1010", project_sku="0200", chip_sku="882", measurements=blocks,
    )  # fmt: skip


def test_offline_skips_are_reported_and_policy_can_require_them(twin: SimulatedGpu) -> None:
    result = _check(twin.payload(NONCE))
    assert _result(result, "gpu_rim") == (
        Status.SKIP, "no RIMs given (offline): measurements not compared with NVIDIA's reference values", False,
    )  # fmt: skip
    assert _result(result, "gpu_ocsp") == (
        Status.SKIP, "offline: certificate revocation not asked (no OCSP client)", False,
    )  # fmt: skip
    strict = VerificationPolicy(
        simulated=SIMULATED.simulated, gpu=GpuPolicy(require_rim=True, require_ocsp=True)
    )
    result = _check(twin.payload(NONCE), policy=strict)
    assert _result(result, "gpu_rim")[2] and _result(result, "gpu_ocsp")[2]


def test_real_rims_match_a_report_made_from_them(vectors: Path, twin: SimulatedGpu) -> None:
    rims = [vectors / DRIVER_RIM, (vectors / VBIOS_RIM).read_bytes()]  # a path and bytes
    status, detail, _ = _result(_check(twin.payload(NONCE), rims=rims, now=IN_2025), "gpu_rim")
    assert status is Status.PASS, detail
    assert detail.startswith(
        "1 device(s) match their RIMs (GPU 0 NV_GPU_VBIOS_1010_0200_882_96005E0001, "
        "GPU 0 NV_GPU_DRIVER_GH100_550.144.03); RIM signatures checked at 2025-03-01T00:00:00+00:00"
    )
    assert detail.endswith("first signing certificate expires 2025-06-22")
    # Today NVIDIA's VBIOS RIM signer has expired, and the check says so.
    status, detail, _ = _result(_check(twin.payload(NONCE), rims=rims, now=TODAY), "gpu_rim")
    assert status is Status.FAIL
    assert "CN=HCC RIM L4 Signer" in detail and "not valid at 2026-11-29T12:00:00+00:00" in detail
    assert "to 2025-06-22" in detail


def test_nvidias_mismatch_rim_fails_and_the_right_one_is_picked(vectors: Path, twin: SimulatedGpu) -> None:
    wrong = [vectors / DRIVER_RIM, vectors / VBIOS_MISMATCH_RIM]
    status, detail, _ = _result(_check(twin.payload(NONCE), rims=wrong, now=IN_2025), "gpu_rim")
    assert (status, detail) == (
        Status.FAIL,
        "GPU 0: measurement(s) 9 (VBIOS) match no alternative in the RIM",
    )
    both = [*wrong, vectors / VBIOS_RIM]
    assert _result(_check(twin.payload(NONCE), rims=both, now=IN_2025), "gpu_rim")[0] is Status.PASS


def test_real_switch_matches_its_real_rim(vectors: Path) -> None:
    path = vectors / "nvidia/attestation-sdk/serialized_test_evidence/switch_evidence_ls10.json"
    (item,) = json.loads(path.read_text())
    entry = GpuEvidenceEntry(decode_evidence(item["evidence"]), base64.b64decode(item["certificate"]), "LS10")
    nonce = bytes.fromhex(item["nonce"])
    result = _check(
        NvidiaPayload(nonce, (entry,), "LS10"),
        nonce,
        VerificationPolicy(),
        rims=[vectors / SWITCH_RIM],
        now=TODAY,
    )
    status, detail, _ = _result(result, "gpu_rim")
    assert status is Status.PASS, detail
    assert "(NVSwitch 0 NV_SWITCH_BIOS_5612_0002_890_9610550001)" in detail
    assert detail.endswith("first signing certificate expires 2027-11-02")
    assert not result.simulated


def test_real_report_without_its_driver_rim(vectors: Path) -> None:
    base = vectors / SDK / "sample_attestation_data/gpu"
    evidence = bytes.fromhex((base / "hopperAttestationReport.txt").read_text().strip())
    nonce = evidence[4:36]
    payload = NvidiaPayload(nonce, (GpuEvidenceEntry(evidence, (base / "hopperCertChain.txt").read_bytes()),))
    result = _check(payload, nonce, VerificationPolicy(), rims=[vectors / VBIOS_RIM], now=IN_2025)
    assert _result(result, "gpu_evidence")[0] is Status.PASS
    assert _result(result, "gpu_rim")[:2] == (
        Status.FAIL,
        "GPU 0: no driver RIM for 535.86.09 among the 1 given (NVIDIA's id NV_GPU_DRIVER_GH100_535.86.09)",
    )
    # Online, the RIM service is asked by NVIDIA's id; here it has the VBIOS RIM but not the driver's.
    asked: list[str] = []

    def service(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path.rsplit("/", 1)[-1])
        if asked[-1] == "NV_GPU_VBIOS_1010_0200_882_96005E0001":
            return httpx.Response(
                200, json={"rim": base64.b64encode((vectors / VBIOS_RIM).read_bytes()).decode()}
            )
        return httpx.Response(404)

    with httpx.Client(transport=httpx.MockTransport(service)) as client:
        result = _check(payload, nonce, VerificationPolicy(), rim_client=client, now=IN_2025)
    assert asked == ["NV_GPU_VBIOS_1010_0200_882_96005E0001", "NV_GPU_DRIVER_GH100_535.86.09"]
    assert (
        _result(result, "gpu_rim")[1]
        == "GPU 0: driver RIM: RIM service answered 404 for NV_GPU_DRIVER_GH100_535.86.09"
    )


def test_rim_service_errors_are_results_not_exceptions(twin: SimulatedGpu) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("no route to host", request=request)

    with httpx.Client(transport=httpx.MockTransport(down)) as client:
        status, detail, _ = _result(_check(twin.payload(NONCE), rim_client=client, now=IN_2025), "gpu_rim")
    assert status is Status.FAIL
    assert "request failed: ConnectError: no route to host" in detail


def test_simulated_rims_need_permission() -> None:
    gpu = SimulatedGpu(bytes(32))
    signer = SimulatedRimSigner(bytes(32))
    rims = [
        signer.sign(version=gpu.vbios_version, measurements=rim_measurements(gpu, range(10))),
        signer.sign(version=gpu.driver_version, measurements=rim_measurements(gpu, range(10, 40))),
    ]
    allowed = _check(gpu.payload(NONCE), rims=rims, now=TODAY)
    assert _result(allowed, "gpu_rim")[0] is Status.PASS and allowed.simulated
    # A real device chain with simulated RIMs: the RIMs are refused unless simulation is allowed.
    refused = _check(gpu.payload(NONCE), policy=VerificationPolicy(), rims=rims, now=TODAY)
    assert _result(refused, "gpu_rim")[1] == "GPU 0: report not verified, so not compared"
    assert "SIMULATED NVIDIA CoRIM signing Root CA" in signer.root_certificate.subject.rfc4514_string()


def test_unusable_rim_input_raises(tmp_path: Path, twin: SimulatedGpu) -> None:
    with pytest.raises(VerificationError, match=r"missing\.xml"):
        _check(twin.payload(NONCE), rims=[tmp_path / "missing.xml"])
    (tmp_path / "bad.xml").write_text("<nope")
    with pytest.raises(VerificationError, match=r"bad\.xml: RIM is not XML"):
        _check(twin.payload(NONCE), rims=[tmp_path / "bad.xml"])
    with pytest.raises(VerificationError, match="timezone-aware"):
        _check(twin.payload(NONCE), now=datetime(2026, 1, 1))


# gpu_ocsp ----------------------------------------------------------------------------------------


@pytest.fixture
def rigged() -> tuple[SimulatedGpu, SimulatedRimSigner, list[bytes]]:
    gpu = SimulatedGpu(bytes(32))
    signer = SimulatedRimSigner(bytes(32))
    rims = [
        signer.sign(version=gpu.vbios_version, measurements=rim_measurements(gpu, range(10))),
        signer.sign(version=gpu.driver_version, measurements=rim_measurements(gpu, range(10, 40))),
    ]
    return gpu, signer, rims


def _online(
    rigged: tuple[SimulatedGpu, SimulatedRimSigner, list[bytes]],
    policy: VerificationPolicy = SIMULATED,
    **knobs: object,
) -> tuple[GpuChecks, FakeOcspResponder]:
    gpu, signer, rims = rigged
    responder = FakeOcspResponder(
        [(gpu.certificates, gpu.private_keys), (signer.certificates, signer.private_keys)],
        TODAY,
        **knobs,  # type: ignore[arg-type]
    )
    with httpx.Client(transport=httpx.MockTransport(responder)) as client:
        return _check(gpu.payload(NONCE), policy=policy, rims=rims, ocsp_client=client, now=TODAY), responder


def test_ocsp_asks_about_device_and_rim_chains(
    rigged: tuple[SimulatedGpu, SimulatedRimSigner, list[bytes]],
) -> None:
    result, responder = _online(rigged)
    assert _result(result, "gpu_ocsp") == (
        Status.PASS, "6 certificate(s) not revoked according to https://ocsp.ndis.nvidia.com/", True,
    )  # fmt: skip
    gpu, signer, _ = rigged
    asked = [r.serial_number for r in responder.requests]
    # Device chain from index 1 (the leaf is not asked about), each RIM chain from index 0, once each.
    assert asked == [c.serial_number for c in (*gpu.certificates[1:4], *signer.certificates[:3])]


def test_ocsp_revoked_and_held(rigged: tuple[SimulatedGpu, SimulatedRimSigner, list[bytes]]) -> None:
    gpu, signer, _ = rigged
    brom = gpu.certificates[1]
    revoked = {brom.serial_number: (ocsp.OCSPCertStatus.REVOKED, x509.ReasonFlags.key_compromise)}
    status, detail, _ = _result(_online(rigged, status=revoked)[0], "gpu_ocsp")
    assert status is Status.FAIL
    assert detail.startswith("GPU 0 certificate 1 (SIMULATED GH100 A01 GSP BROM): revoked (key_compromise)")
    held = {
        signer.certificates[0].serial_number: (ocsp.OCSPCertStatus.REVOKED, x509.ReasonFlags.certificate_hold)
    }
    status, detail, _ = _result(_online(rigged, status=held)[0], "gpu_ocsp")
    assert (
        status is Status.FAIL
        and "certificate 0 (SIMULATED HCC RIM L4 Signer): revoked (certificate_hold)" in detail
    )
    lenient = VerificationPolicy(simulated=SIMULATED.simulated, gpu=GpuPolicy(allow_ocsp_hold=True))
    status, detail, _ = _result(_online(rigged, lenient, status=held)[0], "gpu_ocsp")
    assert status is Status.PASS
    assert detail.endswith(
        "GPU 0 NV_GPU_VBIOS_SIM_SIM_SIM_96009F0001 certificate 0 (SIMULATED HCC RIM L4 Signer) on hold (allowed by policy)"
    )


def test_ocsp_failures_are_results_not_exceptions(
    rigged: tuple[SimulatedGpu, SimulatedRimSigner, list[bytes]],
) -> None:
    status, detail, _ = _result(_online(rigged, nonce="omit")[0], "gpu_ocsp")
    assert status is Status.FAIL and "carries no nonce" in detail
    gpu, _, rims = rigged

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    with httpx.Client(transport=httpx.MockTransport(down)) as client:
        result = _check(gpu.payload(NONCE), rims=rims, ocsp_client=client, now=TODAY)
    assert "OCSP request failed: ConnectTimeout: timed out" in _result(result, "gpu_ocsp")[1]
    # An untrusted chain is not asked about, and that fails the check.
    with httpx.Client(transport=httpx.MockTransport(down)) as client:
        refused = _check(gpu.payload(NONCE), policy=VerificationPolicy(), ocsp_client=client, now=TODAY)
    assert _result(refused, "gpu_ocsp")[:2] == (Status.FAIL, "GPU 0: chain not trusted, revocation not asked")
