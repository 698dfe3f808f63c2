"""NVIDIA GPU evidence primitives against real Hopper evidence, NRAS replies and the simulator."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tee_inference.attestation import nvidia_certs
from tee_inference.attestation.nvidia_certs import (
    NVIDIA_DEVICE_IDENTITY_CA_SHA256,
    GpuCertificateChainError,
    GpuTrustAnchorError,
    certificate_fwid,
    decode_certificate_chain,
    load_nvidia_root,
    verify_certificate_chain,
)
from tee_inference.attestation.nvidia_nras import (
    NrasResponseError,
    NrasSignatureError,
    parse_nras_response,
    verify_nras_jwt,
)
from tee_inference.attestation.nvidia_payload import NvidiaPayload, NvidiaPayloadError, decode_evidence
from tee_inference.attestation.nvidia_simulated import SimulatedGpu
from tee_inference.attestation.nvidia_spdm import (
    OPAQUE_FIELD_FWID,
    GpuAttestationError,
    GpuEvidence,
    GpuEvidenceFormatError,
    GpuEvidenceSignatureError,
    GpuNonceMismatchError,
    parse_gpu_evidence,
    verify_evidence_nonce,
    verify_evidence_signature,
)

HOPPER_NONCE = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb"
NEARAI_NONCE = "89d36f654c47ef2bb6ed989c9655ea19548a9057a97ef4e0b7ad54dfcf5e6b00"
HOPPER_SUBJECT_CNS = (
    "GH100 A01 GSP FMC LF",
    "GH100 A01 GSP BROM",
    "NVIDIA GH100 Provisioner ICA 1",
    "NVIDIA GH100 Identity",
    "NVIDIA Device Identity CA",
)
SEED = bytes(range(32))


# Fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expected(vectors: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((vectors / "nvidia" / "expected.json").read_text())
    return data


@pytest.fixture(scope="module")
def hopper_raw(vectors: Path) -> bytes:
    return bytes.fromhex((vectors / "nvidia" / "hopperAttestationReport.txt").read_text())


@pytest.fixture(scope="module")
def hopper_chain(vectors: Path) -> list[x509.Certificate]:
    return decode_certificate_chain((vectors / "nvidia" / "hopperCertChain.txt").read_bytes())


@pytest.fixture(scope="module")
def nearai_text(vectors: Path) -> str:
    return (vectors / "nvidia" / "nearai_nvidia_payload.json").read_text()


@pytest.fixture(scope="module")
def root() -> x509.Certificate:
    return load_nvidia_root()


@pytest.fixture(scope="module")
def sim() -> SimulatedGpu:
    return SimulatedGpu(SEED)


def _check(raw: bytes, nonce: bytes, leaf: x509.Certificate) -> None:
    """The full evidence check a verifier runs: structure, freshness, signature."""
    evidence = parse_gpu_evidence(raw)
    verify_evidence_nonce(evidence, nonce)
    verify_evidence_signature(evidence, leaf)


def _accepts(raw: bytes, nonce: bytes, leaf: x509.Certificate) -> bool:
    try:
        _check(raw, nonce, leaf)
    except GpuAttestationError:
        return False
    return True


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


# Real Hopper evidence ---------------------------------------------------------------------------


def test_hopper_report_layout(hopper_raw: bytes, expected: dict[str, Any]) -> None:
    facts = expected["hopperAttestationReport.txt+hopperCertChain.txt"]
    evidence = parse_gpu_evidence(hopper_raw)

    assert len(evidence.raw) == facts["report_len"] == 4117
    assert evidence.request_nonce.hex() == facts["request_nonce_bytes_4_36"] == HOPPER_NONCE
    assert hopper_raw[4:36] == evidence.request_nonce
    assert evidence.response_nonce.hex() == facts["response_nonce"]
    assert (evidence.spdm_version, evidence.request_param1, evidence.request_param2) == (0x11, 0x01, 0xFF)
    assert evidence.slot_id == facts["spdm_request"]["slot_id"]
    assert len(evidence.measurements) == facts["spdm_response_header"]["number_of_blocks"] == 64
    assert [m.index for m in evidence.measurements] == list(range(1, 65))
    assert all(len(m.value) == 48 for m in evidence.measurements)
    assert sum(any(m.value) for m in evidence.measurements) == facts["measurement_blocks_nonzero"]
    assert {str(f.field_id): f.value.hex() for f in evidence.opaque_fields} == facts["opaque_fields_hex"]
    assert evidence.driver_version == "550.90.07"
    assert evidence.vbios_version == "96.00.9F.00.01"
    assert evidence.signed_bytes == hopper_raw[:-96]
    assert evidence.signature == hopper_raw[-96:]


def test_hopper_signature_verifies_with_leaf(hopper_raw: bytes, hopper_chain: list[x509.Certificate]) -> None:
    verify_evidence_signature(parse_gpu_evidence(hopper_raw), hopper_chain[0])


def test_hopper_signature_fails_with_another_certificate(
    hopper_raw: bytes, hopper_chain: list[x509.Certificate]
) -> None:
    with pytest.raises(GpuEvidenceSignatureError, match="GSP BROM"):
        verify_evidence_signature(parse_gpu_evidence(hopper_raw), hopper_chain[1])


def test_hopper_chain_verifies_to_pinned_root(
    hopper_chain: list[x509.Certificate], root: x509.Certificate, expected: dict[str, Any]
) -> None:
    facts = expected["hopperAttestationReport.txt+hopperCertChain.txt"]["certs"]
    result = verify_certificate_chain(hopper_chain, root, at=datetime(2025, 6, 1, tzinfo=UTC))

    assert tuple(_cn(c) for c in result.certificates) == HOPPER_SUBJECT_CNS
    assert list(result.subjects) == [c["subject"] for c in facts]
    assert [c.fingerprint(hashes.SHA256()).hex() for c in hopper_chain] == [
        c["sha256_fingerprint"] for c in facts
    ]
    assert result.anchor_in_chain
    assert result.leaf is hopper_chain[0]
    assert result.not_after == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def test_chain_without_its_root_still_anchors(
    hopper_chain: list[x509.Certificate], root: x509.Certificate
) -> None:
    result = verify_certificate_chain(hopper_chain[:-1], root)
    assert not result.anchor_in_chain


def test_chain_validity_is_checked_only_when_asked(
    hopper_chain: list[x509.Certificate], root: x509.Certificate
) -> None:
    # The Provisioner ICA (position 2) starts on 2022-03-01, the latest notBefore in the chain.
    with pytest.raises(GpuCertificateChainError, match=r"certificate 2 .*Provisioner ICA 1.*not valid at"):
        verify_certificate_chain(hopper_chain, root, at=datetime(2022, 2, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_certificate_chain(hopper_chain, root, at=datetime(2025, 1, 1))


def test_chain_with_a_certificate_removed_names_the_position(
    hopper_chain: list[x509.Certificate], root: x509.Certificate
) -> None:
    broken = [hopper_chain[0], *hopper_chain[2:]]
    with pytest.raises(GpuCertificateChainError, match=r"certificate 0 \(.*GSP FMC LF.*\)"):
        verify_certificate_chain(broken, root)


def test_chain_to_a_foreign_root_fails(hopper_chain: list[x509.Certificate], sim: SimulatedGpu) -> None:
    with pytest.raises(GpuCertificateChainError, match=r"certificate 4 \(.*NVIDIA Device Identity CA"):
        verify_certificate_chain(hopper_chain, sim.root_certificate)


def test_chain_in_the_wrong_order_fails(hopper_chain: list[x509.Certificate], root: x509.Certificate) -> None:
    with pytest.raises(GpuCertificateChainError, match="certificate 0"):
        verify_certificate_chain(list(reversed(hopper_chain)), root)
    with pytest.raises(GpuCertificateChainError, match="empty"):
        verify_certificate_chain([], root)


def test_pinned_root_is_the_vector_root(hopper_chain: list[x509.Certificate], root: x509.Certificate) -> None:
    assert root.fingerprint(hashes.SHA256()).hex() == NVIDIA_DEVICE_IDENTITY_CA_SHA256
    assert root == hopper_chain[-1]
    assert _cn(root) == "NVIDIA Device Identity CA"


def test_pinned_root_refused_when_fingerprint_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvidia_certs, "NVIDIA_DEVICE_IDENTITY_CA_SHA256", "00" * 32)
    with pytest.raises(GpuTrustAnchorError, match="pinned"):
        load_nvidia_root()


def test_leaf_fwid_matches_opaque_field(hopper_raw: bytes, hopper_chain: list[x509.Certificate]) -> None:
    fwid = certificate_fwid(hopper_chain[0])
    assert fwid is not None
    assert len(fwid) == 48
    assert parse_gpu_evidence(hopper_raw).opaque_field(OPAQUE_FIELD_FWID) == fwid
    assert certificate_fwid(hopper_chain[1]) is None


def test_every_sampled_single_byte_tamper_is_detected(
    hopper_raw: bytes, hopper_chain: list[x509.Certificate]
) -> None:
    nonce = bytes.fromhex(HOPPER_NONCE)
    assert _accepts(hopper_raw, nonce, hopper_chain[0])
    # Every byte of the request and of the tail (nonce, opaque data, signature), and a stride
    # through the measurement record; the whole report takes seconds, this a fraction of one.
    offsets = sorted({*range(0, 45), *range(45, 3565, 7), *range(3565, len(hopper_raw))})
    accepted = []
    for offset in offsets:
        tampered = bytearray(hopper_raw)
        tampered[offset] ^= 0x01
        if _accepts(bytes(tampered), nonce, hopper_chain[0]):
            accepted.append(offset)
    assert accepted == []


@pytest.mark.parametrize(
    ("offset", "error"),
    [
        (4, GpuNonceMismatchError),  # first byte of the request nonce
        (35, GpuNonceMismatchError),  # last byte of the request nonce
        (45 + 7 + 10, GpuEvidenceSignatureError),  # inside measurement block 1's digest
        (3565, GpuEvidenceSignatureError),  # response nonce
        (4117 - 96, GpuEvidenceSignatureError),  # first byte of r
        (4116, GpuEvidenceSignatureError),  # last byte of s
    ],
)
def test_tamper_is_reported_as_the_right_error(
    hopper_raw: bytes, hopper_chain: list[x509.Certificate], offset: int, error: type[Exception]
) -> None:
    tampered = bytearray(hopper_raw)
    tampered[offset] ^= 0x80
    with pytest.raises(error):
        _check(bytes(tampered), bytes.fromhex(HOPPER_NONCE), hopper_chain[0])


def test_format_errors_name_field_and_offset(hopper_raw: bytes) -> None:
    with pytest.raises(GpuEvidenceFormatError, match="measurement record at byte 45") as info:
        parse_gpu_evidence(hopper_raw[:100])
    assert (info.value.field, info.value.offset) == ("measurement record", 45)
    with pytest.raises(GpuEvidenceFormatError, match=r"signature at byte 4021: expected 96 bytes"):
        parse_gpu_evidence(hopper_raw + b"\x00")
    with pytest.raises(GpuEvidenceFormatError, match=r"request code \(GET_MEASUREMENTS\) at byte 1"):
        parse_gpu_evidence(hopper_raw[:1] + b"\xe1" + hopper_raw[2:])
    with pytest.raises(GpuEvidenceFormatError, match="request SPDM version at byte 0"):
        parse_gpu_evidence(hopper_raw.hex().encode("ascii"))  # hex text is not evidence
    with pytest.raises(GpuEvidenceFormatError, match="unsigned"):
        parse_gpu_evidence(hopper_raw[:2] + b"\x00" + hopper_raw[3:])


# The nearai payload (evidence as base64 of hex text) ----------------------------------------


def test_nearai_payload_decodes_and_verifies(
    nearai_text: str, root: x509.Certificate, expected: dict[str, Any]
) -> None:
    facts = expected["nearai_nvidia_payload.json"]
    payload = NvidiaPayload.from_json(nearai_text)
    assert payload.nonce.hex() == facts["payload_nonce"] == NEARAI_NONCE
    assert payload.arch == "HOPPER"
    (entry,) = payload.entries
    assert entry.arch == "HOPPER"  # the entry has no arch of its own; the payload's applies

    evidence = entry.parse()
    assert len(evidence.raw) == facts["report_len"] == 4115
    assert evidence.request_nonce == payload.nonce
    assert evidence.response_nonce.hex() == facts["response_nonce"]
    assert len(evidence.measurements) == 64
    assert {str(f.field_id): f.value.hex() for f in evidence.opaque_fields} == facts["opaque_fields_hex"]
    assert (evidence.driver_version, evidence.vbios_version) == ("550.135", "96.00.9D.00.02")

    chain = entry.certificates()
    verify_evidence_signature(evidence, chain[0])
    result = verify_certificate_chain(chain, root)
    assert list(result.subjects) == [c["subject"] for c in facts["certs"]]
    assert certificate_fwid(chain[0]) == evidence.opaque_field(OPAQUE_FIELD_FWID)


def test_payload_reencodes_as_raw(nearai_text: str) -> None:
    payload = NvidiaPayload.from_json(nearai_text)
    obj = json.loads(payload.to_json())
    assert list(obj) == ["nonce", "evidence_list", "arch"]
    (item,) = obj["evidence_list"]
    raw = base64.b64decode(item["evidence"])
    assert raw[:2] == b"\x11\xe0"
    assert raw == payload.entries[0].evidence
    assert base64.b64decode(item["certificate"]).startswith(b"-----BEGIN CERTIFICATE-----")
    assert item["arch"] == obj["arch"] == "HOPPER"
    assert NvidiaPayload.from_json(payload.to_json()) == payload


def test_evidence_forms_are_told_apart(hopper_raw: bytes) -> None:
    as_raw = base64.b64encode(hopper_raw).decode()
    as_hex = base64.b64encode(hopper_raw.hex().encode()).decode()
    as_upper_hex = base64.b64encode(hopper_raw.hex().upper().encode()).decode()
    assert decode_evidence(as_raw) == decode_evidence(as_hex) == decode_evidence(as_upper_hex) == hopper_raw
    for bad in ("not base64!", base64.b64encode(b"hello").decode(), base64.b64encode(b"11e0f").decode()):
        with pytest.raises(NvidiaPayloadError):
            decode_evidence(bad)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.update(nonce="abcd"), "nonce"),
        (lambda o: o.update(evidence_list=[]), "non-empty"),
        (lambda o: o.pop("arch"), "arch"),
        (lambda o: o["evidence_list"][0].update(certificate=base64.b64encode(b"x").decode()), "PEM"),
        (lambda o: o["evidence_list"][0].update(evidence="AAAA"), "evidence"),
    ],
)
def test_malformed_payloads_are_refused(nearai_text: str, mutate: Any, message: str) -> None:
    obj = json.loads(nearai_text)
    mutate(obj)
    with pytest.raises(NvidiaPayloadError, match=message):
        NvidiaPayload.from_json(json.dumps(obj))


# NRAS replies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "gpus"), [("nras_response.json", 1), ("nras_ppcie_response.json", 8)])
def test_nras_replies_parse_and_digests_hold(vectors: Path, name: str, gpus: int) -> None:
    reply = json.loads((vectors / "dstack" / name).read_text())
    facts = json.loads((vectors / "dstack" / "expected.json").read_text())[name.removesuffix(".json")]
    result = parse_nras_response(reply)

    assert result.overall.header == facts["overall"]["header"]
    assert result.overall.claims == facts["overall"]["claims"]
    assert result.eat_nonce == facts["overall"]["claims"]["eat_nonce"]
    assert result.overall_result
    assert [g.name for g in result.gpus] == [f"GPU-{i}" for i in range(gpus)]
    for gpu in result.gpus:
        assert gpu.jwt.header["alg"] == "ES384"
        assert gpu.measres == "success"
        assert gpu.nonce_match
        subset = facts["per_gpu"][gpu.name]["claims_subset"]
        assert (gpu.driver_version, gpu.vbios_version) == (
            subset["x-nvidia-gpu-driver-version"],
            subset["x-nvidia-gpu-vbios-version"],
        )
    assert parse_nras_response(json.dumps(reply)) == result


def test_nras_single_gpu_values(vectors: Path) -> None:
    result = parse_nras_response((vectors / "dstack" / "nras_response.json").read_text())
    assert result.eat_nonce.startswith("56f5c2c4")
    assert result.eat_nonce.endswith("b6d7")
    gpu = result.gpu("GPU-0")
    assert (gpu.driver_version, gpu.vbios_version, gpu.measres) == ("570.172.08", "96.00.CF.00.02", "success")


def test_nras_tampered_gpu_token_is_detected(vectors: Path) -> None:
    reply = json.loads((vectors / "dstack" / "nras_ppcie_response.json").read_text())
    header, claims, signature = reply[1]["GPU-3"].split(".")
    forged = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    forged["measres"] = "success!"
    claims = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    reply[1]["GPU-3"] = f"{header}.{claims}.{signature}"
    with pytest.raises(NrasResponseError, match="GPU-3: sha256 of its token"):
        parse_nras_response(reply)


def test_nras_missing_or_swapped_gpu_is_detected(vectors: Path) -> None:
    reply = json.loads((vectors / "dstack" / "nras_ppcie_response.json").read_text())
    swapped = json.loads(json.dumps(reply))
    swapped[1]["GPU-0"], swapped[1]["GPU-1"] = swapped[1]["GPU-1"], swapped[1]["GPU-0"]
    with pytest.raises(NrasResponseError, match="GPU-0"):
        parse_nras_response(swapped)
    del reply[1]["GPU-7"]
    with pytest.raises(NrasResponseError, match="GPU-7"):
        parse_nras_response(reply)
    with pytest.raises(NrasResponseError):
        parse_nras_response({"not": "a reply"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _es384_token(key: ec.EllipticCurvePrivateKey, kid: str, claims: dict[str, Any]) -> str:
    signing_input = (
        _b64url(json.dumps({"kid": kid, "alg": "ES384"}).encode())
        + "."
        + _b64url(json.dumps(claims).encode())
    )
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA384())))
    return signing_input + "." + _b64url(r.to_bytes(48, "big") + s.to_bytes(48, "big"))


def _jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-384",
        "kid": kid,
        "x": _b64url(numbers.x.to_bytes(48, "big")),
        "y": _b64url(numbers.y.to_bytes(48, "big")),
    }


def test_verify_nras_jwt_with_a_jwks() -> None:
    key, other = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    claims = {"eat_nonce": "ab" * 32, "nbf": 1_700_000_000, "exp": 1_700_003_600}
    token = _es384_token(key, "k1", claims)
    jwks = {"keys": [_jwk(other, "k0"), _jwk(key, "k1")]}

    assert verify_nras_jwt(token, jwks) == claims
    assert verify_nras_jwt(token, jwks, at=datetime.fromtimestamp(1_700_000_100, UTC)) == claims
    with pytest.raises(NrasSignatureError, match="expired"):
        verify_nras_jwt(token, jwks, at=datetime.fromtimestamp(1_800_000_000, UTC))
    with pytest.raises(NrasSignatureError, match="does not verify"):
        verify_nras_jwt(token, {"keys": [_jwk(other, "k1")]})
    with pytest.raises(NrasSignatureError, match="no key with kid"):
        verify_nras_jwt(token, {"keys": [_jwk(key, "k9")]})
    head, body, sig = token.split(".")
    forged_body = _b64url(json.dumps({**claims, "eat_nonce": "cd" * 32}).encode())
    with pytest.raises(NrasSignatureError):
        verify_nras_jwt(f"{head}.{forged_body}.{sig}", jwks)
    assert body != forged_body


def test_real_nras_token_does_not_verify_with_a_foreign_key(vectors: Path) -> None:
    result = parse_nras_response((vectors / "dstack" / "nras_response.json").read_text())
    kid = result.overall.header["kid"]
    foreign = {"keys": [_jwk(ec.generate_private_key(ec.SECP384R1()), kid)]}
    for token in result.tokens:
        with pytest.raises(NrasSignatureError, match="does not verify"):
            verify_nras_jwt(token, foreign)


# Simulation --------------------------------------------------------------------------------------


def test_simulated_evidence_round_trip(sim: SimulatedGpu) -> None:
    nonce = hashlib.sha256(b"client nonce").digest()
    raw = sim.evidence(nonce)
    evidence = parse_gpu_evidence(raw)

    assert isinstance(evidence, GpuEvidence)
    assert raw[4:36] == evidence.request_nonce == nonce
    assert raw[:4] == b"\x11\xe0\x01\xff"
    assert len(evidence.measurements) == 64
    assert evidence.measurements == sim.measurements()
    assert (evidence.driver_version, evidence.vbios_version) == (sim.driver_version, sim.vbios_version)
    assert evidence.opaque_field(OPAQUE_FIELD_FWID) == certificate_fwid(sim.certificates[0]) == sim.fwid
    verify_evidence_nonce(evidence, nonce)
    verify_evidence_signature(evidence, sim.certificates[0])
    assert not _accepts(raw, bytes(32), sim.certificates[0])


def test_simulated_chain_verifies_to_its_own_root_only(sim: SimulatedGpu, root: x509.Certificate) -> None:
    chain = decode_certificate_chain(sim.certificate_chain_pem())
    result = verify_certificate_chain(chain, sim.root_certificate, at=datetime.now(UTC))
    assert len(chain) == 5
    assert result.anchor_in_chain
    assert all(_cn(c).startswith("SIMULATED ") for c in chain)
    assert _cn(sim.root_certificate) == "SIMULATED NVIDIA Device Identity CA"
    with pytest.raises(GpuCertificateChainError, match="certificate 4"):
        verify_certificate_chain(chain, root)


def test_simulated_evidence_fails_against_real_leaf(
    sim: SimulatedGpu, hopper_chain: list[x509.Certificate]
) -> None:
    evidence = parse_gpu_evidence(sim.evidence(bytes(32)))
    with pytest.raises(GpuEvidenceSignatureError):
        verify_evidence_signature(evidence, hopper_chain[0])


def test_simulation_is_deterministic_with_a_seed(sim: SimulatedGpu) -> None:
    nonce = b"\x42" * 32
    again = SimulatedGpu(SEED)
    assert again.certificate_chain_pem() == sim.certificate_chain_pem()
    assert again.evidence(nonce) == sim.evidence(nonce)
    other = SimulatedGpu(b"\x01" * 32)
    assert other.certificate_chain_pem() != sim.certificate_chain_pem()
    assert SimulatedGpu().certificate_chain_pem() != SimulatedGpu().certificate_chain_pem()
    with pytest.raises(ValueError, match="32 bytes"):
        SimulatedGpu(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        sim.evidence(b"short")


def test_simulated_payload_round_trips(sim: SimulatedGpu) -> None:
    nonce = b"\x07" * 32
    payload = sim.payload(nonce)
    decoded = NvidiaPayload.from_json(payload.to_json())
    assert decoded == payload
    (entry,) = decoded.entries
    evidence = entry.parse()
    assert evidence.request_nonce == decoded.nonce == nonce
    verify_evidence_signature(evidence, entry.certificates()[0])
    verify_certificate_chain(entry.certificates(), sim.root_certificate)


def test_simulated_versions_are_configurable() -> None:
    gpu = SimulatedGpu(SEED, driver_version="570.172.08", vbios_version="96.00.CF.00.02")
    evidence = parse_gpu_evidence(gpu.evidence(bytes(32)))
    assert (evidence.driver_version, evidence.vbios_version) == ("570.172.08", "96.00.CF.00.02")
    with pytest.raises(ValueError, match="VBIOS"):
        SimulatedGpu(vbios_version="96.00")
