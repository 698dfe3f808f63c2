"""report_data packing (SPEC §3) and the explanations a verifier prints when it does not match."""

from __future__ import annotations

import pytest

from tee_inference.attestation.report_data import (
    ReportDataError,
    explain_report_data_mismatch,
    report_data_for,
    report_data_for_ecdsa,
    report_data_for_ed25519,
)

ADDRESS = bytes.fromhex("d8414f83c1335627b31d08eba6d2da5fa53a0a83")
NONCE = bytes(range(32))
PUBLIC_KEY = bytes(range(100, 132))


def test_ecdsa_layout() -> None:
    data = report_data_for_ecdsa(ADDRESS, NONCE)
    assert len(data) == 64
    assert data[:20] == ADDRESS
    assert data[20:32] == bytes(12)
    assert data[32:] == NONCE


def test_ed25519_layout() -> None:
    data = report_data_for_ed25519(PUBLIC_KEY, NONCE)
    assert data == PUBLIC_KEY + NONCE


def test_dispatch_by_algorithm_name() -> None:
    assert report_data_for("ecdsa", ADDRESS, NONCE) == report_data_for_ecdsa(ADDRESS, NONCE)
    assert report_data_for("ed25519", PUBLIC_KEY, NONCE) == report_data_for_ed25519(PUBLIC_KEY, NONCE)
    with pytest.raises(ReportDataError, match="unknown signing algorithm"):
        report_data_for("rsa", ADDRESS, NONCE)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: report_data_for_ecdsa(ADDRESS[:19], NONCE), "signing address must be 20 bytes, got 19"),
        (lambda: report_data_for_ecdsa(ADDRESS, NONCE + b"\0"), "nonce must be 32 bytes, got 33"),
        (lambda: report_data_for_ed25519(ADDRESS, NONCE), "ed25519 public key must be 32 bytes, got 20"),
        (lambda: report_data_for_ed25519(PUBLIC_KEY, b""), "nonce must be 32 bytes, got 0"),
    ],
)
def test_wrong_lengths_are_refused(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ReportDataError, match=message):
        call()


def test_report_data_error_is_a_value_error() -> None:
    assert issubclass(ReportDataError, ValueError)


def test_equal_report_data_has_no_explanation() -> None:
    data = report_data_for_ecdsa(ADDRESS, NONCE)
    assert explain_report_data_mismatch(data, data, "ecdsa") is None
    data = report_data_for_ed25519(PUBLIC_KEY, NONCE)
    assert explain_report_data_mismatch(data, data, "ed25519") is None


def test_ecdsa_wrong_nonce_names_only_the_nonce() -> None:
    expected = report_data_for_ecdsa(ADDRESS, NONCE)
    other_nonce = NONCE[:5] + b"\xff" + NONCE[6:]
    actual = report_data_for_ecdsa(ADDRESS, other_nonce)
    text = explain_report_data_mismatch(expected, actual, "ecdsa")
    assert text is not None
    assert "nonce (32–63) differs from byte 37" in text
    assert NONCE.hex() in text
    assert other_nonce.hex() in text
    assert "signing address" not in text
    assert "zero padding" not in text


def test_ecdsa_wrong_address_and_padding_are_both_named() -> None:
    expected = report_data_for_ecdsa(ADDRESS, NONCE)
    actual = bytearray(expected)
    actual[0] ^= 1
    actual[25] = 7
    text = explain_report_data_mismatch(expected, bytes(actual), "ecdsa")
    assert text is not None
    assert "signing address (bytes 0–19) differs from byte 0" in text
    assert "zero padding (20–31) differs from byte 25" in text
    assert "nonce" not in text


def test_ed25519_wrong_key_is_named() -> None:
    expected = report_data_for_ed25519(PUBLIC_KEY, NONCE)
    actual = report_data_for_ed25519(bytes(32), NONCE)
    text = explain_report_data_mismatch(expected, actual, "ed25519")
    assert text is not None
    assert "public key (0–31) differs from byte 0" in text
    assert PUBLIC_KEY.hex() in text
    assert "nonce" not in text


def test_explanation_refuses_bad_inputs() -> None:
    data = report_data_for_ecdsa(ADDRESS, NONCE)
    with pytest.raises(ReportDataError, match="actual report_data must be 64 bytes"):
        explain_report_data_mismatch(data, data[:63], "ecdsa")
    with pytest.raises(ReportDataError, match="unknown signing algorithm"):
        explain_report_data_mismatch(data, data, "secp256r1")


def test_dstack_placeholder_report_data_is_explained() -> None:
    # The dstack sample quote carries 64 × 0x01: nothing a real key and nonce would give.
    actual = b"\x01" * 64
    text = explain_report_data_mismatch(report_data_for_ecdsa(ADDRESS, NONCE), actual, "ecdsa")
    assert text is not None
    for region in ("signing address", "zero padding", "nonce"):
        assert region in text
