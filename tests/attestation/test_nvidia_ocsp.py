"""OCSP requests and responses, against a faithful fake responder over the simulated chains."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from fakes.ocsp_responder import FakeOcspResponder, delegate
from tee_inference.attestation.nvidia_ocsp import (
    NVIDIA_OCSP_URL,
    OcspError,
    ask_ocsp,
    build_ocsp_request,
    revocation_targets,
)
from tee_inference.attestation.nvidia_simulated import SimulatedGpu
from tee_inference.attestation.nvidia_simulated_rim import SimulatedRimSigner

NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)
GPU = SimulatedGpu(bytes(32))
CHAIN = GPU.certificates  # leaf, BROM, Provisioner ICA, Identity, root
ROOT = GPU.root_certificate


def _forger() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A key and certificate that merely claim the Identity CA's name."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = CHAIN[3].subject
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA384())
    )  # fmt: skip
    return cert, key


def _responder(**knobs: object) -> FakeOcspResponder:
    return FakeOcspResponder([(CHAIN, GPU.private_keys)], NOW, **knobs)  # type: ignore[arg-type]


def _ask_chain(
    responder: FakeOcspResponder, *, allow_hold: bool = False, chain: tuple[x509.Certificate, ...] = CHAIN
) -> list[str]:
    with httpx.Client(transport=httpx.MockTransport(responder)) as client:
        return [
            ask_ocsp(client, cert, issuer, root=ROOT, at=NOW, chain=chain, allow_hold=allow_hold).status
            for _, cert, issuer in revocation_targets(chain, ROOT, first=1)
        ]


def test_request_is_what_nvidia_sends() -> None:
    request = ocsp.load_der_ocsp_request(build_ocsp_request(CHAIN[1], CHAIN[2], b"\x07" * 32))
    assert isinstance(request.hash_algorithm, hashes.SHA384)
    assert request.serial_number == CHAIN[1].serial_number
    assert request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"\x07" * 32


def test_which_certificates_are_asked_about() -> None:
    device = revocation_targets(CHAIN, ROOT, first=1)
    assert [(p, c, i) for p, c, i in device] == [
        (1, CHAIN[1], CHAIN[2]),
        (2, CHAIN[2], CHAIN[3]),
        (3, CHAIN[3], CHAIN[4]),
    ]
    # A chain that stops short of the root: its last certificate is asked about under the root.
    assert revocation_targets(CHAIN[:4], ROOT, first=1)[-1] == (3, CHAIN[3], ROOT)
    rim = SimulatedRimSigner(bytes(32))
    assert [p for p, _, _ in revocation_targets(rim.certificates, rim.root_certificate, first=0)] == [0, 1, 2]


def test_good_chain() -> None:
    responder = _responder()
    assert _ask_chain(responder) == ["good", "good", "good"]
    assert [r.serial_number for r in responder.requests] == [c.serial_number for c in CHAIN[1:4]]
    # Each request carries its own fresh nonce.
    nonces = {r.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce for r in responder.requests}
    assert len(nonces) == 3


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        (
            {
                "status": {
                    CHAIN[2].serial_number: (ocsp.OCSPCertStatus.REVOKED, x509.ReasonFlags.key_compromise)
                }
            },
            r"revoked \(key_compromise\) at 2026-10-30",
        ),
        ({"status": {CHAIN[1].serial_number: (ocsp.OCSPCertStatus.UNKNOWN, None)}}, "does not know"),
        (
            {
                "status": {
                    CHAIN[3].serial_number: (ocsp.OCSPCertStatus.REVOKED, x509.ReasonFlags.certificate_hold)
                }
            },
            r"revoked \(certificate_hold\)",
        ),
        ({"nonce": "omit"}, "carries no nonce"),
        ({"nonce": "wrong"}, "nonce is not the one asked for"),
        (
            {"next_update": timedelta(hours=-2), "this_update": timedelta(days=-1)},
            "expired at its nextUpdate",
        ),
        ({"this_update": timedelta(hours=1)}, "thisUpdate .* is after"),
        (
            {"next_update": None, "this_update": timedelta(days=-2)},
            "names no nextUpdate and is over a day old",
        ),
        ({"other_serial": True}, "is not about serial"),
        ({"signer": _forger(), "include_signer": False}, "signed neither by the issuer"),
        ({"unsuccessful": ocsp.OCSPResponseStatus.UNAUTHORIZED}, "responder answered UNAUTHORIZED"),
        ({"http_status": 503}, "HTTP 503 from https://ocsp.ndis.nvidia.com/"),
    ],
)
def test_bad_answers_fail(knobs: dict[str, object], message: str) -> None:
    with pytest.raises(OcspError, match=message):
        _ask_chain(_responder(**knobs))


def test_hold_passes_only_when_allowed() -> None:
    held = {CHAIN[2].serial_number: (ocsp.OCSPCertStatus.REVOKED, x509.ReasonFlags.certificate_hold)}
    assert _ask_chain(_responder(status=held), allow_hold=True) == [
        "good",
        "on hold (allowed by policy)",
        "good",
    ]
    # Allowing hold never lets another revocation through.
    revoked = {CHAIN[2].serial_number: (ocsp.OCSPCertStatus.REVOKED, x509.ReasonFlags.superseded)}
    with pytest.raises(OcspError, match="superseded"):
        _ask_chain(_responder(status=revoked), allow_hold=True)


def test_delegated_responder_must_be_authorised_and_chain_to_the_root() -> None:
    assert _ask_chain(_responder(signer=delegate(ROOT, GPU.private_keys[-1], NOW))) == ["good"] * 3
    with pytest.raises(OcspError, match="not authorised to sign OCSP"):
        _ask_chain(_responder(signer=delegate(ROOT, GPU.private_keys[-1], NOW, ocsp_signing=False)))
    foreign = SimulatedGpu(b"\x05" * 32)
    with pytest.raises(OcspError, match="does not chain to"):
        _ask_chain(_responder(signer=delegate(foreign.root_certificate, foreign.private_keys[-1], NOW)))
    expired = delegate(ROOT, GPU.private_keys[-1], NOW - timedelta(days=60))
    with pytest.raises(OcspError, match="not valid at"):
        _ask_chain(_responder(signer=expired))


def test_rim_chain_from_index_zero() -> None:
    rim = SimulatedRimSigner(bytes(32))
    responder = FakeOcspResponder([(rim.certificates, rim.private_keys)], NOW)
    with httpx.Client(transport=httpx.MockTransport(responder)) as client:
        statuses = [
            ask_ocsp(client, cert, issuer, root=rim.root_certificate, at=NOW).status
            for _, cert, issuer in revocation_targets(rim.certificates, rim.root_certificate, first=0)
        ]
    assert statuses == ["good"] * 3
    assert NVIDIA_OCSP_URL == "https://ocsp.ndis.nvidia.com/"
