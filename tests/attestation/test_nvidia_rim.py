"""RIMs: NVIDIA's published files verified under the pinned CoRIM root, compared with real reports."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tee_inference.attestation import nvidia_rim
from tee_inference.attestation.nvidia_payload import decode_evidence
from tee_inference.attestation.nvidia_rim import (
    NVIDIA_RIM_ROOT_CA_SHA256,
    RIM_SERVICE_URL,
    Rim,
    RimError,
    RimFormatError,
    RimTrustAnchorError,
    compare_rims,
    driver_rim_id,
    fetch_rim,
    load_rim_root,
    parse_rim,
    vbios_rim_id,
    verify_rim,
)
from tee_inference.attestation.nvidia_simulated import SimulatedGpu
from tee_inference.attestation.nvidia_simulated_rim import SimulatedRimSigner, rim_measurements
from tee_inference.attestation.nvidia_spdm import GpuEvidence, parse_gpu_evidence

TODAY = datetime(2026, 11, 29, tzinfo=UTC)
IN_2025 = datetime(2025, 3, 1, tzinfo=UTC)  # when the VBIOS RIMs' signers were still valid
SDK = "nvidia/attestation-sdk/testdata/"
DRIVER_RIM = SDK + "NV_GPU_DRIVER_GH100_550.144.03.xml"
SWITCH_RIM = SDK + "switchVBIOSRim_NV_SWITCH_BIOS_5612_0002_890_9610550001.xml"
VBIOS_RIM = "nvidia/1010_0200_882_96005E0001_PROD.swidtag"
VBIOS_MISMATCH_RIM = SDK + "sample_rims/NV_GPU_VBIOS_1010_0200_882_96005E0001_measurement_mismatch.xml"


def _read(vectors: Path, name: str) -> bytes:
    return (vectors / name).read_bytes()


@pytest.fixture(scope="module")
def report_535(vectors: Path) -> GpuEvidence:
    """The attestation-sdk sample Hopper report: driver 535.86.09, VBIOS 96.00.5E.00.01."""
    text = (vectors / SDK / "sample_attestation_data/gpu/hopperAttestationReport.txt").read_text()
    return parse_gpu_evidence(bytes.fromhex(text.strip()))


@pytest.fixture(scope="module")
def switch_report(vectors: Path) -> GpuEvidence:
    path = vectors / "nvidia/attestation-sdk/serialized_test_evidence/switch_evidence_ls10.json"
    (item,) = json.loads(path.read_text())
    return parse_gpu_evidence(decode_evidence(item["evidence"]))


def test_pinned_rim_root() -> None:
    root = load_rim_root()
    assert root.fingerprint(hashes.SHA256()).hex() == NVIDIA_RIM_ROOT_CA_SHA256
    assert root.subject.rfc4514_string() == "CN=NVIDIA CoRIM signing Root CA,O=NVIDIA,C=US"
    assert root.not_valid_after_utc == datetime(2053, 3, 8, 15, 37, 34, tzinfo=UTC)


def test_pinned_rim_root_refused_when_fingerprint_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvidia_rim, "NVIDIA_RIM_ROOT_CA_SHA256", "00" * 32)
    with pytest.raises(RimTrustAnchorError, match="pinned"):
        load_rim_root()


def test_driver_rim_verifies_today(vectors: Path) -> None:
    rim = verify_rim(_read(vectors, DRIVER_RIM), load_rim_root(), at=TODAY)
    assert (rim.colloquial_version, rim.edition, rim.product) == ("550.144.03", "GPU", "GH100")
    assert len(rim.measurements) == 64 and len(rim.active) == 21
    assert len(rim.active[35].alternatives) == 4
    assert [c.subject.rfc4514_string().split(",")[0] for c in rim.certificates] == [
        "CN=HCC RIM L4 Signer", "C=US", "C=US", "CN=NVIDIA CoRIM signing Root CA",
    ]  # fmt: skip
    assert rim.certificates[0].not_valid_after_utc.date().isoformat() == "2026-12-30"


def test_switch_rim_verifies_and_matches_the_switch_report(vectors: Path, switch_report: GpuEvidence) -> None:
    rim = verify_rim(_read(vectors, SWITCH_RIM), load_rim_root(), at=TODAY)
    assert (rim.colloquial_version, rim.edition, rim.product, len(rim.active)) == (
        "96.10.55.00.01",
        "SWITCH",
        "LS10",
        31,
    )
    assert vbios_rim_id(switch_report, switch=True) == "NV_SWITCH_BIOS_5612_0002_890_9610550001"
    assert compare_rims(switch_report, rim) == []


def test_vbios_rim_matches_the_real_report(vectors: Path, report_535: GpuEvidence) -> None:
    rim = verify_rim(_read(vectors, VBIOS_RIM), load_rim_root(), at=IN_2025)
    assert vbios_rim_id(report_535, switch=False) == "NV_GPU_VBIOS_1010_0200_882_96005E0001"
    assert driver_rim_id(report_535, "GH100") == "NV_GPU_DRIVER_GH100_535.86.09"
    assert compare_rims(report_535, rim) == []
    # NVIDIA's negative sample: a validly signed RIM whose index 9 is not this board's.
    mismatch = verify_rim(_read(vectors, VBIOS_MISMATCH_RIM), load_rim_root(), at=IN_2025)
    assert compare_rims(report_535, mismatch) == ["measurement(s) 9 (VBIOS) match no alternative in the RIM"]


def test_expired_rim_signer_is_named(vectors: Path) -> None:
    with pytest.raises(
        RimError, match=r"certificate 0 \(CN=HCC RIM L4 Signer.*not valid at 2026-11-29.*to 2025-06-22"
    ):
        verify_rim(_read(vectors, VBIOS_RIM), load_rim_root(), at=TODAY)


def test_rim_with_a_broken_signature_fails(vectors: Path) -> None:
    with pytest.raises(RimError, match=r"550\.144\.03 signature does not verify: InvalidSignature"):
        verify_rim(_read(vectors, SDK + "incorrect_signature_driver_rim.xml"), load_rim_root(), at=TODAY)


def test_rim_under_another_root_fails(vectors: Path) -> None:
    xml = _read(vectors, SDK + "incorrect_cert_chain_driver_rim.xml")
    assert (
        parse_rim(xml)
        .certificates[-1]
        .subject.rfc4514_string()
        .endswith("CN=NVIDIA CoRIM L1 Root CA Debug Only")
    )
    with pytest.raises(RimError, match="signing chain: certificate 0"):
        verify_rim(xml, load_rim_root(), at=TODAY)


def test_a_signed_byte_changed_fails(vectors: Path) -> None:
    xml = _read(vectors, DRIVER_RIM)
    active = parse_rim(xml).active[7].alternatives[0].hex()
    tampered = xml.replace(active.encode(), ("0" + active[1:]).encode())
    assert tampered != xml
    with pytest.raises(RimError, match="InvalidDigest"):
        verify_rim(tampered, load_rim_root(), at=TODAY)


def test_malformed_rims_are_format_errors() -> None:
    with pytest.raises(RimFormatError, match="not XML"):
        parse_rim(b"<SoftwareIdentity")
    with pytest.raises(RimFormatError, match="not a SWID"):
        parse_rim(b"<foo/>")
    with pytest.raises(RimFormatError, match="no Meta"):
        parse_rim(b'<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd"/>')


def test_entities_are_refused() -> None:
    xml = (
        b'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd">'
        b'<Meta colloquialVersion="&x;" edition="GPU" product="GH100"/></SoftwareIdentity>'
    )
    with pytest.raises(RimFormatError, match="external entity"):
        parse_rim(xml)


# Comparison rules, on RIMs made for a simulated GPU -------------------------------------------------


@pytest.fixture(scope="module")
def signer() -> SimulatedRimSigner:
    return SimulatedRimSigner(bytes(32))


def _sim_rims(
    signer: SimulatedRimSigner, gpu: SimulatedGpu, driver: dict[int, tuple[bytes, ...]], indices: int = 64
) -> tuple[Rim, Rim]:
    vbios = signer.sign(version=gpu.vbios_version, measurements=rim_measurements(gpu, range(10)))
    drv = signer.sign(version=gpu.driver_version, measurements=driver, indices=indices)
    root = signer.root_certificate
    return verify_rim(vbios, root, at=TODAY), verify_rim(drv, root, at=TODAY)


def test_comparison_rules(signer: SimulatedRimSigner) -> None:
    gpu = SimulatedGpu(bytes(32))
    evidence = parse_gpu_evidence(gpu.evidence(bytes(32)))
    golden = rim_measurements(gpu, range(10, 40))
    vbios, driver = _sim_rims(signer, gpu, golden)
    assert compare_rims(evidence, vbios, driver) == []
    # Any alternative may match.
    _, driver = _sim_rims(signer, gpu, {**golden, 20: (b"\x01" * 48, *golden[20])})
    assert compare_rims(evidence, vbios, driver) == []
    # A wrong value, a wrong size, a block the report lacks.
    wrong = {20: (b"\x01" * 48,), 21: (golden[21][0][:32],), 64: (b"\x02" * 48,)}
    _, driver = _sim_rims(signer, gpu, {**golden, **wrong}, indices=65)
    assert compare_rims(evidence, vbios, driver) == [
        "measurement(s) 20 (driver), 21 (driver), 64 (driver: no block 65 in the report) match no alternative in the RIM"
    ]
    # Both RIMs claiming an index; a RIM for another version.
    _, driver = _sim_rims(signer, gpu, {**golden, 5: golden[10]})
    assert "driver and VBIOS RIMs both claim index(es) [5]" in compare_rims(evidence, vbios, driver)
    other = SimulatedGpu(bytes(32), driver_version="550.90.08")
    assert compare_rims(parse_gpu_evidence(other.evidence(bytes(32))), vbios, driver)[0] == (
        "driver RIM is for 550.90.07, the report says 550.90.08"
    )


def test_nvdec_index_35_is_skipped_only_when_nvdec_is_off(signer: SimulatedRimSigner) -> None:
    for status, expected in (
        (0x55, []),
        (0xAA, ["measurement(s) 35 (driver) match no alternative in the RIM"]),
    ):
        gpu = SimulatedGpu(bytes(32), nvdec_status=status)
        golden = {**rim_measurements(gpu, range(10, 40)), 35: (b"\x03" * 48,)}
        vbios, driver = _sim_rims(signer, gpu, golden)
        assert compare_rims(parse_gpu_evidence(gpu.evidence(bytes(32))), vbios, driver) == expected


def test_simulated_rim_never_passes_under_the_real_root(signer: SimulatedRimSigner) -> None:
    gpu = SimulatedGpu(bytes(32))
    xml = signer.sign(version=gpu.vbios_version, measurements=rim_measurements(gpu, range(10)))
    assert verify_rim(xml, signer.root_certificate, at=TODAY).colloquial_version == gpu.vbios_version
    with pytest.raises(RimError, match="does not end at the trust anchor CN=NVIDIA CoRIM signing Root CA"):
        verify_rim(xml, load_rim_root(), at=TODAY)
    expiring = SimulatedRimSigner(bytes(32), signer_not_after=datetime(2026, 1, 1, tzinfo=UTC))
    xml = expiring.sign(version="1", measurements={})
    with pytest.raises(RimError, match=r"SIMULATED HCC RIM L4 Signer.*not valid at 2026-11-29"):
        verify_rim(xml, expiring.root_certificate, at=TODAY)


def test_rim_service_client(vectors: Path) -> None:
    xml = _read(vectors, DRIVER_RIM)
    asked: list[str] = []

    def service(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        if request.url.path.endswith("550.144.03"):
            return httpx.Response(200, json={"id": "x", "rim": base64.b64encode(xml).decode()})
        if request.url.path.endswith("bad"):
            return httpx.Response(200, json={"rim": "not base64!"})
        return httpx.Response(404)

    with httpx.Client(transport=httpx.MockTransport(service)) as client:
        assert fetch_rim(client, "NV_GPU_DRIVER_GH100_550.144.03") == xml
        with pytest.raises(RimError, match="answered 404"):
            fetch_rim(client, "NV_GPU_DRIVER_GH100_1.0")
        with pytest.raises(RimFormatError, match="no base64 'rim'"):
            fetch_rim(client, "bad")
    assert asked[0] == RIM_SERVICE_URL + "NV_GPU_DRIVER_GH100_550.144.03"
    assert asked[0] == "https://rim.attestation.nvidia.com/v1/rim/NV_GPU_DRIVER_GH100_550.144.03"


def test_real_driver_rim_certificates(vectors: Path) -> None:
    certs = parse_rim(_read(vectors, DRIVER_RIM)).certificates
    assert certs[-1] == load_rim_root()
    assert all(isinstance(c, x509.Certificate) for c in certs)


def test_rim_ids_of_real_reports(vectors: Path) -> None:
    base = vectors / SDK / "sample_attestation_data/gpu"
    blackwell = parse_gpu_evidence(
        bytes.fromhex((base / "blackwellAttestationReport.txt").read_text().strip())
    )
    assert driver_rim_id(blackwell, "GB100") == "NV_GPU_CC_DRIVER_GB100_575.32"  # no CHIP_INFO: GB100
    assert vbios_rim_id(blackwell, switch=False) == "NV_GPU_VBIOS_G525_0220_886_970088000F"
    hopper = parse_gpu_evidence(bytes.fromhex((vectors / "nvidia/hopperAttestationReport.txt").read_text()))
    assert driver_rim_id(hopper, "GH100") == "NV_GPU_DRIVER_GH100_550.90.07"
    assert vbios_rim_id(hopper, switch=False) == "NV_GPU_VBIOS_1010_0200_882_96009F0001"
