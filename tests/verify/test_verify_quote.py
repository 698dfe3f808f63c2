"""Quote verification on real quotes: dcap-qvl with collateral, bit flips, validity window, offline mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from tee_inference.verify import Status, VerificationPolicy, Verifier, parse_collateral

NOW = 1750400000  # inside the sample collateral's window (1750329147–1752919234)

# Offsets across header, TD report body and signature data, with what must be named.
FLIPS = {
    0: ("quote_structure", "header.version at offset 0"),
    2: ("quote_structure", "header.att_key_type at offset 2"),
    4: ("quote_structure", "header.tee_type at offset 4"),
    8: ("quote_signature", "ISV enclave report signature is invalid"),
    12: ("quote_signature", "Unknown QE vendor ID"),
    28: ("quote_signature", "ISV enclave report signature is invalid"),
    48: ("quote_signature", "ISV enclave report signature is invalid"),
    64: ("quote_signature", "ISV enclave report signature is invalid"),
    160: ("quote_signature", "ISV enclave report signature is invalid"),
    168: ("td_attributes", "DEBUG is set"),
    176: ("quote_signature", "ISV enclave report signature is invalid"),
    184: ("quote_signature", "ISV enclave report signature is invalid"),
    232: ("quote_signature", "ISV enclave report signature is invalid"),
    376: ("quote_signature", "ISV enclave report signature is invalid"),
    424: ("quote_signature", "ISV enclave report signature is invalid"),
    472: ("quote_signature", "ISV enclave report signature is invalid"),
    520: ("quote_signature", "ISV enclave report signature is invalid"),
    568: ("quote_signature", "ISV enclave report signature is invalid"),
    631: ("quote_signature", "ISV enclave report signature is invalid"),
    632: ("quote_structure", "unexplained bytes"),
    636: ("quote_signature", "not signed by the attestation key"),
    700: ("quote_signature", "QE report hash mismatch"),
    1000: ("quote_signature", "qe_report_signature"),
    1500: ("quote_signature", "pck_chain"),
    # dcap-qvl accepts this one (a byte in the PEM's NUL padding): only our parser catches it.
    4935: ("quote_signature", "dcap-qvl accepted the quote but offline check failed: pck_chain"),
    4936: ("quote_structure", "non-zero byte 0x01 at offset 4936"),
}


@pytest.fixture(scope="module")
def sample(vectors: Path) -> tuple[bytes, object]:
    quote = (vectors / "tdx/dcap_qvl_sample_quote.bin").read_bytes()
    collateral = parse_collateral((vectors / "tdx/dcap_qvl_sample_collateral.json").read_text())
    return quote, collateral


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier.production()


def test_sample_quote_is_up_to_date(sample: tuple[bytes, object], verifier: Verifier) -> None:
    quote, collateral = sample
    result = verifier.verify_quote(quote, VerificationPolicy(), collateral=collateral, now=NOW)
    assert result.ok, result.blocking
    assert result.check("tcb_status").detail == "UpToDate"
    assert result.attested["tcb_status"] == "UpToDate"
    assert "dcap-qvl with collateral" in result.check("quote_signature").detail
    assert result.attested["mrtd"].startswith("91eb2b44")


@pytest.mark.parametrize("offset", sorted(FLIPS))
def test_one_bit_flip_is_detected(sample: tuple[bytes, object], verifier: Verifier, offset: int) -> None:
    quote, collateral = sample
    damaged = bytearray(quote)
    damaged[offset] ^= 1
    result = verifier.verify_quote(bytes(damaged), VerificationPolicy(), collateral=collateral, now=NOW)
    assert not result.ok
    name, message = FLIPS[offset]
    check = result.check(name)
    assert check.status is Status.FAIL
    assert message in check.detail


@pytest.mark.parametrize(
    ("now", "message"),
    [
        (1750329146, "issue date is in the future"),
        (1752919235, "CrlExpired"),
        (1760000000, "expired"),
    ],
)
def test_outside_the_validity_window(
    sample: tuple[bytes, object], verifier: Verifier, now: int, message: str
) -> None:
    quote, collateral = sample
    result = verifier.verify_quote(quote, VerificationPolicy(), collateral=collateral, now=now)
    assert not result.ok
    assert message in result.check("quote_signature").detail
    assert result.check("tcb_status").status is Status.SKIP


def test_edges_of_the_window_pass(sample: tuple[bytes, object], verifier: Verifier) -> None:
    quote, collateral = sample
    for now in (1750329147, 1752919234):
        assert verifier.verify_quote(quote, VerificationPolicy(), collateral=collateral, now=now).ok


def test_tcb_policy_refuses_what_it_does_not_accept(sample: tuple[bytes, object], verifier: Verifier) -> None:
    from tee_inference.verify import TcbPolicy

    quote, collateral = sample
    strict = VerificationPolicy(tcb=TcbPolicy(accept=frozenset({"SWHardeningNeeded"})))
    result = verifier.verify_quote(quote, strict, collateral=collateral, now=NOW)
    assert result.check("tcb_status").status is Status.FAIL
    assert "UpToDate is not accepted" in result.check("tcb_status").detail


def test_offline_without_collateral_checks_the_chain_and_skips_tcb(vectors: Path, verifier: Verifier) -> None:
    quote = (vectors / "dstack/quote.hex").read_text()
    result = verifier.verify_quote(quote, VerificationPolicy())
    assert result.check("quote_signature").status is Status.PASS
    assert "pinned Intel SGX Root CA" in result.check("quote_signature").detail
    assert result.check("tcb_status").status is Status.SKIP
    assert not result.ok  # a required skip
    relaxed = verifier.verify_quote(quote, VerificationPolicy(relax=frozenset({"tcb_status"})))
    assert relaxed.ok


def test_other_platform_fails_with_fmspc_mismatch(
    sample: tuple[bytes, object], vectors: Path, verifier: Verifier
) -> None:
    _, collateral = sample
    quote = (vectors / "tdx/nearai_e2e_quote.bin").read_bytes()
    result = verifier.verify_quote(quote, VerificationPolicy(), collateral=collateral, now=NOW)
    # The quote itself is sound; the collateral belongs to another platform. That is a TCB
    # problem to fix by fetching the right collateral, not a bad signature.
    assert result.check("quote_signature").status is Status.PASS
    assert "collateral not applicable" in result.check("quote_signature").detail
    tcb = result.check("tcb_status")
    assert tcb.status is Status.FAIL
    assert "collateral is for platform FMSPC B0C06F000000" in tcb.detail
    assert "PCK certificate is for 90C06F000000" in tcb.detail
    assert result.check("quote_structure").status is Status.PASS


def test_dstack_event_log_replays(vectors: Path, verifier: Verifier) -> None:
    quote = (vectors / "dstack/quote.hex").read_text()
    log = (vectors / "dstack/event_log.json").read_text()
    result = verifier.verify_quote(quote, VerificationPolicy(relax=frozenset({"tcb_status"})), event_log=log)
    assert result.ok, result.blocking
    assert "29 events" in result.check("event_log_replay").detail
    assert result.check("runtime_events").status is Status.PASS
    assert "compose hash: 62dd36d2" in result.check("rtmr3_events").detail
    # dstack's real MRCONFIGID is 01 ‖ compose_hash ‖ 00×15, and the verifier checks it.
    assert result.check("mrconfigid").status is Status.PASS


@pytest.mark.parametrize("index", [0, 7, 13, 17, 19, 20, 28])
def test_event_digest_tamper_names_the_rtmr(vectors: Path, verifier: Verifier, index: int) -> None:
    import json

    quote = (vectors / "dstack/quote.hex").read_text()
    events = json.loads((vectors / "dstack/event_log.json").read_text())
    digest = bytearray.fromhex(events[index]["digest"])
    digest[5] ^= 0x80
    events[index]["digest"] = digest.hex()
    result = verifier.verify_quote(quote, VerificationPolicy(), event_log=events)
    check = result.check("event_log_replay")
    assert check.status is Status.FAIL
    assert f"RTMR{events[index]['imr']}: quote has" in check.detail


def test_runtime_event_payload_tamper_is_detected(vectors: Path, verifier: Verifier) -> None:
    import json

    quote = (vectors / "dstack/quote.hex").read_text()
    events = json.loads((vectors / "dstack/event_log.json").read_text())
    index = next(i for i, e in enumerate(events) if e["event"] == "compose-hash")
    payload = bytearray.fromhex(events[index]["event_payload"])
    payload[0] ^= 1
    events[index]["event_payload"] = payload.hex()
    check = verifier.verify_quote(quote, VerificationPolicy(), event_log=events).check("event_log_replay")
    assert check.status is Status.FAIL
    assert f"event_log[{index}] ('compose-hash')" in check.detail
