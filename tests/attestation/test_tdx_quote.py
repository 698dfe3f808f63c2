"""TDX v4 quote parsing on real quotes, the ECDSA structure check, and the simulated signer."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tee_inference.attestation.tdx_quote import (
    CERT_DATA_QE_REPORT,
    INTEL_QE_VENDOR_ID,
    SIG_DATA_OFFSET,
    STEP_CERTIFICATION_DATA,
    STEP_PCK_CHAIN,
    STEP_QE_REPORT_DATA,
    STEP_QE_REPORT_SIGNATURE,
    STEP_QUOTE_SIGNATURE,
    Quote,
    QuoteFormatError,
    QuoteSignatureError,
    is_simulated_quote,
    load_pck_chain,
    load_quote,
    parse_quote,
    td_debug,
    verify_quote_ecdsa,
)
from tee_inference.attestation.tdx_simulated import SimulatedQuoteSigner

SAMPLES = {
    # file → (expected.json, key holding the fields)
    "tdx/dcap_qvl_sample_quote.bin": ("tdx/dcap_qvl_sample_expected.json", ("fields",)),
    "tdx/nearai_e2e_quote.bin": ("tdx/nearai_e2e_quote_expected.json", ("fields",)),
    "dstack/quote.hex": ("dstack/expected.json", ("quote", "fields")),
}
HEADER_FIELDS = ("version", "att_key_type", "qe_svn", "pce_svn")
HEX_HEADER_FIELDS = ("qe_vendor_id", "user_data")
REPORT_FIELDS = (
    "tee_tcb_svn", "mrseam", "mrsignerseam", "seam_attributes", "td_attributes", "xfam", "mrtd",
    "mrconfigid", "mrowner", "mrownerconfig", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data",
)  # fmt: skip
SEED = bytes(range(32))
MRTD = bytes.fromhex("aa" * 48)
RTMRS = [bytes([i]) * 48 for i in range(1, 5)]


def _read_quote_bytes(vectors: Path, name: str) -> bytes:
    data = (vectors / name).read_bytes()
    return bytes.fromhex(data.decode()) if name.endswith(".hex") else data


def _expected_fields(vectors: Path, name: str) -> dict[str, Any]:
    path, keys = SAMPLES[name]
    data: dict[str, Any] = json.loads((vectors / path).read_text())
    for key in keys:
        data = data[key]
    return data


def _flip(data: bytes, offset: int, bit: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= bit
    return bytes(out)


def _chain_root(quote: Quote) -> Any:
    assert quote.pck_chain_pem is not None
    return load_pck_chain(quote.pck_chain_pem)[-1]


# --- real quotes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_real_quote_fields_match_expected(vectors: Path, name: str) -> None:
    raw = _read_quote_bytes(vectors, name)
    quote = parse_quote(raw)
    fields = _expected_fields(vectors, name)
    for field in HEADER_FIELDS:
        assert getattr(quote.header, field) == fields[field], field
    for field in HEX_HEADER_FIELDS:
        assert getattr(quote.header, field).hex() == fields[field], field
    assert quote.header.tee_type == int(fields["tee_type"], 16) == 0x81
    for field in REPORT_FIELDS:
        assert getattr(quote.td_report, field).hex() == fields[field], field
    assert quote.sig_data_len == fields["sig_data_len"]
    assert quote.padding_length == 70
    assert len(raw) == SIG_DATA_OFFSET + quote.sig_data_len + quote.padding_length
    assert quote.td_report.rtmrs == tuple(bytes.fromhex(fields[f"rtmr{i}"]) for i in range(4))
    assert quote.report_data == quote.td_report.report_data
    assert quote.signed_region == raw[:632]
    assert quote.header.qe_vendor_id == INTEL_QE_VENDOR_ID
    assert quote.certification_data_type == CERT_DATA_QE_REPORT
    assert quote.qe_auth_data == bytes(range(32))
    assert not td_debug(quote.td_report)
    assert not is_simulated_quote(quote)


def test_dstack_quote_mrconfigid_carries_the_compose_hash(vectors: Path) -> None:
    quote = load_quote((vectors / "dstack" / "quote.hex").read_text())
    expected = json.loads((vectors / "dstack" / "expected.json").read_text())
    assert len(quote.raw) == expected["quote"]["len_bytes"] == 5010
    assert quote.report_data == b"\x01" * 64
    mrconfigid = quote.td_report.mrconfigid
    compose_hash = next(
        bytes.fromhex(e["event_payload"])
        for e in json.loads((vectors / "dstack" / "event_log.json").read_text())
        if e["event"] == "compose-hash"
    )
    assert mrconfigid == b"\x01" + compose_hash + bytes(15)
    assert expected["mrconfigid_layout"]["equals_0x01_compose_hash_zero_pad"] is True


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_real_quote_ecdsa_structure_holds_under_its_own_root(vectors: Path, name: str) -> None:
    quote = parse_quote(_read_quote_bytes(vectors, name))
    chain = load_pck_chain(quote.pck_chain_pem or b"")
    assert [c.subject.rfc4514_string().rsplit("CN=", 1)[1] for c in chain] == [
        "Intel SGX PCK Certificate",
        "Intel SGX PCK Platform CA",
        "Intel SGX Root CA",
    ]
    verify_quote_ecdsa(quote, chain[-1])
    # A root the chain does not lead to is refused, whatever else holds.
    with pytest.raises(QuoteSignatureError) as info:
        verify_quote_ecdsa(quote, SimulatedQuoteSigner(SEED).root_certificate)
    assert info.value.step == STEP_PCK_CHAIN


def test_load_quote_accepts_binary_and_hex_forms(vectors: Path) -> None:
    raw = _read_quote_bytes(vectors, "tdx/dcap_qvl_sample_quote.bin")
    reference = parse_quote(raw)
    for form in (raw, raw.hex(), "0x" + raw.hex().upper(), f"  {raw.hex()}\n", raw.hex().encode() + b"\n"):
        assert load_quote(form) == reference
    hex_text = (vectors / "dstack" / "quote.hex").read_bytes()
    assert load_quote(hex_text) == load_quote(hex_text.decode())
    with pytest.raises(QuoteFormatError, match="neither a binary quote nor valid hex"):
        load_quote("0x" + raw.hex()[:-1])


def test_non_zero_padding_is_refused(vectors: Path) -> None:
    raw = _read_quote_bytes(vectors, "tdx/dcap_qvl_sample_quote.bin")
    sig_end = SIG_DATA_OFFSET + 4300
    for offset in (sig_end, len(raw) - 1):
        with pytest.raises(QuoteFormatError, match=f"non-zero byte 0x01 at offset {offset} in the padding"):
            parse_quote(_flip(raw, offset))
    # Padding is optional: the quote without it is the same quote.
    assert parse_quote(raw[:sig_end]).padding_length == 0


def test_every_truncation_is_refused(vectors: Path) -> None:
    raw = _read_quote_bytes(vectors, "tdx/dcap_qvl_sample_quote.bin")
    sig_end = SIG_DATA_OFFSET + 4300
    for length in range(sig_end):
        with pytest.raises(QuoteFormatError):
            parse_quote(raw[:length])


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"\x05\x00", "header.version at offset 0 is 5"),
        (2, b"\x03\x00", "header.att_key_type at offset 2 is 3"),
        (4, b"\x00\x00\x00\x00", "header.tee_type at offset 4 is 0x0"),
        (
            632,
            struct.pack("<I", 4301),
            r"sig_data \(per sig_data_len\) ends at offset 4937 .*\(1 unexplained",
        ),
        (
            632,
            struct.pack("<I", 4299),
            r"certification data \(type 6\) at offset 770 needs 4166 .* only 4165",
        ),
        (632, struct.pack("<I", 99999), r"sig_data_len at offset 632 is 99999 .*\(truncated quote"),
        (636 + 130, struct.pack("<I", 4165), r"sig_data \(per sig_data_len\) .*\(1 unexplained"),
        (636 + 130, struct.pack("<I", 4167), r"certification data \(type 6\) at offset 770 needs 4167"),
        (636 + 128 + 6 + 384 + 64, b"\x21\x00", "nested certification data type at offset 1253"),
        (
            636 + 128 + 6 + 384 + 64 + 2 + 32,
            b"\x04\x00",
            "nested certification data type at offset 1252 is 4",
        ),
    ],
)
def test_inconsistent_lengths_and_types_are_named(
    vectors: Path, offset: int, value: bytes, message: str
) -> None:
    raw = bytearray(_read_quote_bytes(vectors, "tdx/dcap_qvl_sample_quote.bin"))
    raw[offset : offset + len(value)] = value
    with pytest.raises(QuoteFormatError, match=message):
        parse_quote(bytes(raw))


def test_quote_errors_are_value_errors() -> None:
    assert issubclass(QuoteFormatError, ValueError)
    assert issubclass(QuoteSignatureError, ValueError)
    error = QuoteSignatureError(STEP_QE_REPORT_DATA, "why")
    assert error.step == STEP_QE_REPORT_DATA
    assert str(error) == "qe_report_data: why"


def test_td_debug_reads_bit_zero() -> None:
    signer = SimulatedQuoteSigner(SEED)
    debug = parse_quote(signer.quote(bytes(64), mrtd=MRTD, rtmrs=RTMRS, td_attributes=b"\x01" + bytes(7)))
    assert td_debug(debug.td_report)
    release = parse_quote(signer.quote(bytes(64), mrtd=MRTD, rtmrs=RTMRS))
    assert not td_debug(release.td_report)


# --- dcap-qvl agrees with the parser -------------------------------------------------------------


def test_dcap_qvl_verifies_the_sample_and_agrees_on_fields(vectors: Path) -> None:
    dcap_qvl = pytest.importorskip("dcap_qvl")
    raw = _read_quote_bytes(vectors, "tdx/dcap_qvl_sample_quote.bin")
    collateral = dcap_qvl.QuoteCollateralV3.from_json(
        (vectors / "tdx" / "dcap_qvl_sample_collateral.json").read_text()
    )
    result = dcap_qvl.verify(raw, collateral, 1750400000)
    assert result.status == "UpToDate"
    assert result.advisory_ids == []
    verified = json.loads(result.to_json())
    assert verified["qe_status"]["status"] == verified["platform_status"]["status"] == "UpToDate"
    td10 = verified["report"]["TD10"]
    quote = parse_quote(raw)
    for ours, theirs in (("mrtd", "mr_td"), ("mrconfigid", "mr_config_id"), ("rtmr0", "rt_mr0"),
                         ("rtmr3", "rt_mr3"), ("report_data", "report_data"), ("xfam", "xfam"),
                         ("td_attributes", "td_attributes"), ("mrseam", "mr_seam")):  # fmt: skip
        assert getattr(quote.td_report, ours).hex() == td10[theirs], ours
    parsed = dcap_qvl.parse_quote(raw)
    assert parsed.header.user_data == quote.header.user_data
    assert parsed.report.rt_mr1 == quote.td_report.rtmr1
    assert parsed.fmspc() == "B0C06F000000"
    assert parsed.cert_chain_pem_bytes().rstrip(b"\0") == (quote.pck_chain_pem or b"").rstrip(b"\0")
    # The same collateral does not fit another platform's quote.
    with pytest.raises(ValueError, match="Fmspc mismatch"):
        dcap_qvl.verify(_read_quote_bytes(vectors, "dstack/quote.hex"), collateral, 1750400000)
    with pytest.raises(ValueError, match="ISV enclave report signature is invalid"):
        dcap_qvl.verify(_flip(raw, 568), collateral, 1750400000)


def test_dcap_qvl_ignores_trailing_bytes_so_the_parser_must_run_too(vectors: Path) -> None:
    # Recorded because a verifier that relies on dcap-qvl alone would accept this altered quote.
    dcap_qvl = pytest.importorskip("dcap_qvl")
    raw = _read_quote_bytes(vectors, "tdx/dcap_qvl_sample_quote.bin")
    collateral = dcap_qvl.QuoteCollateralV3.from_json(
        (vectors / "tdx" / "dcap_qvl_sample_collateral.json").read_text()
    )
    tampered = _flip(raw, len(raw) - 1)
    assert dcap_qvl.verify(tampered, collateral, 1750400000).status == "UpToDate"
    with pytest.raises(QuoteFormatError):
        parse_quote(tampered)


# --- simulated quotes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signer() -> SimulatedQuoteSigner:
    return SimulatedQuoteSigner(SEED)


@pytest.fixture(scope="module")
def simulated(signer: SimulatedQuoteSigner) -> bytes:
    return signer.quote(b"\x42" * 64, mrtd=MRTD, rtmrs=RTMRS, mrconfigid=b"\x01" + bytes(47))


def test_simulated_quote_round_trips(signer: SimulatedQuoteSigner, simulated: bytes) -> None:
    quote = parse_quote(simulated)
    assert (quote.header.version, quote.header.att_key_type, quote.header.tee_type) == (4, 2, 0x81)
    assert quote.header.qe_vendor_id == INTEL_QE_VENDOR_ID
    assert quote.td_report.mrtd == MRTD
    assert list(quote.td_report.rtmrs) == RTMRS
    assert quote.td_report.mrconfigid == b"\x01" + bytes(47)
    assert quote.report_data == b"\x42" * 64
    assert quote.padding_length == 0
    assert quote.attestation_key == signer.attestation_public_key
    assert quote.certification_data_type == CERT_DATA_QE_REPORT
    assert quote.qe_report is not None
    assert quote.qe_report.isv_prod_id == 2
    verify_quote_ecdsa(quote, signer.root_certificate)
    assert is_simulated_quote(quote)
    assert load_quote(simulated.hex()) == quote


def test_simulated_chain_is_labelled(signer: SimulatedQuoteSigner, simulated: bytes) -> None:
    chain = load_pck_chain(parse_quote(simulated).pck_chain_pem or b"")
    assert len(chain) == 2
    assert chain[-1] == signer.root_certificate
    for cert in chain:
        assert "SIMULATED" in cert.subject.rfc4514_string()
    # Zero padding after the signature data is accepted here too, as on real quotes.
    verify_quote_ecdsa(parse_quote(simulated + bytes(70)), signer.root_certificate)


def test_simulated_signer_is_deterministic_with_a_seed(simulated: bytes) -> None:
    again = SimulatedQuoteSigner(SEED)
    assert again.quote(b"\x42" * 64, mrtd=MRTD, rtmrs=RTMRS, mrconfigid=b"\x01" + bytes(47)) == simulated
    der = serialization.Encoding.DER
    assert again.root_certificate.public_bytes(der) == SimulatedQuoteSigner(
        SEED
    ).root_certificate.public_bytes(der)
    other = SimulatedQuoteSigner(bytes(32))
    assert other.quote(b"\x42" * 64, mrtd=MRTD, rtmrs=RTMRS, mrconfigid=b"\x01" + bytes(47)) != simulated
    with pytest.raises(QuoteSignatureError) as info:
        verify_quote_ecdsa(parse_quote(simulated), other.root_certificate)
    assert info.value.step == STEP_PCK_CHAIN


def test_unseeded_signers_differ() -> None:
    a, b = SimulatedQuoteSigner(), SimulatedQuoteSigner()
    assert a.attestation_public_key != b.attestation_public_key
    verify_quote_ecdsa(parse_quote(a.quote(bytes(64), mrtd=MRTD, rtmrs=RTMRS)), a.root_certificate)


def test_simulated_signer_refuses_bad_inputs(signer: SimulatedQuoteSigner) -> None:
    with pytest.raises(ValueError, match="seed must be 32 bytes"):
        SimulatedQuoteSigner(b"short")
    with pytest.raises(QuoteFormatError, match="report_data must be 64 bytes, got 32"):
        signer.quote(bytes(32), mrtd=MRTD, rtmrs=RTMRS)
    with pytest.raises(QuoteFormatError, match="rtmrs must hold 4 values"):
        signer.quote(bytes(64), mrtd=MRTD, rtmrs=RTMRS[:3])
    with pytest.raises(QuoteFormatError, match="rtmr2 must be 48 bytes"):
        signer.quote(bytes(64), mrtd=MRTD, rtmrs=[*RTMRS[:2], bytes(32), RTMRS[3]])


def _regions(quote: Quote) -> dict[str, tuple[int, int]]:
    qe = SIG_DATA_OFFSET + 128 + 6
    auth_len = len(quote.qe_auth_data or b"")
    pem = qe + 384 + 64 + 2 + auth_len + 6
    return {
        "signed_region": (0, 632),
        "signature": (SIG_DATA_OFFSET, SIG_DATA_OFFSET + 64),
        "attestation_key": (SIG_DATA_OFFSET + 64, SIG_DATA_OFFSET + 128),
        "qe_report": (qe, qe + 384),
        "qe_report_signature": (qe + 384, qe + 448),
        "qe_auth_data": (qe + 450, qe + 450 + auth_len),
        "pck_chain": (pem, SIG_DATA_OFFSET + quote.sig_data_len),
    }


STEP_FOR_REGION = {
    "signed_region": STEP_QUOTE_SIGNATURE,
    "signature": STEP_QUOTE_SIGNATURE,
    "attestation_key": STEP_QE_REPORT_DATA,
    "qe_report": STEP_QE_REPORT_SIGNATURE,
    "qe_report_signature": STEP_QE_REPORT_SIGNATURE,
    "qe_auth_data": STEP_QE_REPORT_DATA,
    "pck_chain": STEP_PCK_CHAIN,
}


@pytest.mark.parametrize("region", sorted(STEP_FOR_REGION))
def test_a_flipped_bit_fails_at_the_step_that_covers_it(
    signer: SimulatedQuoteSigner, simulated: bytes, region: str
) -> None:
    start, end = _regions(parse_quote(simulated))[region]
    for offset in range(start, end):
        for bit in (0x01, 0x80):
            tampered = _flip(simulated, offset, bit)
            try:
                quote = parse_quote(tampered)
            except QuoteFormatError:
                continue  # PEM bytes are not length fields, but flipping one is caught either way
            with pytest.raises(QuoteSignatureError) as info:
                verify_quote_ecdsa(quote, signer.root_certificate)
            assert info.value.step == STEP_FOR_REGION[region], (region, offset, bit, str(info.value))


def test_no_single_bit_flip_of_a_real_quote_survives(vectors: Path) -> None:
    # Every byte: padding, length fields, the NUL after the PEM and PEM line breaks included.
    raw = _read_quote_bytes(vectors, "tdx/dcap_qvl_sample_quote.bin")
    root = _chain_root(parse_quote(raw))
    for offset in range(len(raw)):
        tampered = _flip(raw, offset)
        with pytest.raises((QuoteFormatError, QuoteSignatureError)):
            verify_quote_ecdsa(parse_quote(tampered), root)


def test_other_certification_data_types_cannot_be_checked_offline(simulated: bytes) -> None:
    # Rewrite the certification data as type 3 (an opaque PCK identifier blob) of the same size.
    raw = bytearray(simulated)
    raw[SIG_DATA_OFFSET + 128 : SIG_DATA_OFFSET + 130] = struct.pack("<H", 3)
    quote = parse_quote(bytes(raw))
    assert quote.certification_data_type == 3
    assert quote.qe_report is None
    assert quote.pck_chain_pem is None
    with pytest.raises(QuoteSignatureError) as info:
        verify_quote_ecdsa(quote, SimulatedQuoteSigner(SEED).root_certificate)
    assert info.value.step == STEP_CERTIFICATION_DATA
    assert not is_simulated_quote(quote)


def test_lenient_pem_variants_are_refused(signer: SimulatedQuoteSigner, simulated: bytes) -> None:
    pem = parse_quote(simulated).pck_chain_pem or b""
    assert len(load_pck_chain(pem + b"\0\0")) == 2
    assert len(load_pck_chain(pem.replace(b"\n", b"\r\n"))) == 2
    for variant in (pem + b"x", b" " + pem, pem.replace(b"\n", b"\x0b", 2), pem.replace(b"=\n", b"\n"), b""):
        with pytest.raises(QuoteFormatError):
            load_pck_chain(variant)
