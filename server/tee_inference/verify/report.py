"""The attestation report (SPEC §3) as input: the checks that tie its parts to what the quote binds.

The quote proves that a TD with certain measurements produced ``report_data``. Only what
``report_data`` binds is attested: the signing address (ecdsa) or the ed25519 public key, and the
nonce. Every other key field of the report is derived from that or checked against it, so a report
whose ``signing_public_key`` can be swapped without touching the quote does not pass. The rest —
model, image, platform — is read from RTMR3 by the phase rules of ``events.py``.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Any

import coincurve

from tee_inference.attestation.eventlog import mrconfigid_for
from tee_inference.attestation.report import AttestationReport
from tee_inference.attestation.report_data import (
    explain_report_data_mismatch,
    report_data_for,
    report_data_for_tls,
)
from tee_inference.signing import address_of, checksum_address
from tee_inference.verify.events import RuntimeClaims
from tee_inference.verify.policy import FRESHNESS, RELAXABLE
from tee_inference.verify.results import CheckResult

REPORT_FORMAT, REPORT_DATA, SIGNING_KEY = "report_format", "report_data", "signing_key"
SIGNING_ALGO, MRCONFIGID, TLS_FINGERPRINT = "signing_algo", "mrconfigid", "tls_fingerprint"
KEYSET_EVENT, MODEL_EVENT, IMAGE_EVENT = "keyset_event", "model_event", "image_event"
SIMULATED = "simulated"


def parse_report(obj: Any) -> tuple[AttestationReport | None, CheckResult]:
    """The typed report, or None and a failed report_format check naming every problem."""
    report, problems = AttestationReport.parse(obj)
    if report is None:
        return None, CheckResult.failed(REPORT_FORMAT, "; ".join(problems) or "not a report")
    return report, CheckResult.passed(
        REPORT_FORMAT, f"{report.signing_algo} report for nonce {report.request_nonce.hex()}"
    )


def check_signing_algo(report: AttestationReport, asked: str | None) -> CheckResult:
    """The report answers with the algorithm the caller asked for (no silent substitution)."""
    if asked is None:
        return CheckResult.passed(SIGNING_ALGO, f"{report.signing_algo} (the caller named none)")
    if report.signing_algo != asked:
        return CheckResult.failed(
            SIGNING_ALGO,
            f"asked for an {asked} report, got {report.signing_algo}: nothing it binds is {asked}",
        )
    return CheckResult.passed(SIGNING_ALGO, f"{asked}, as asked")


def check_freshness(report: AttestationReport, nonce: bytes | None) -> CheckResult:
    if nonce is None:
        return CheckResult.skipped(
            FRESHNESS,
            "no nonce of yours (--nonce): the report binds only its own request_nonce, so it could "
            f"be a replay ({RELAXABLE[FRESHNESS]} accepts that)",
        )
    if not hmac.compare_digest(nonce, report.request_nonce):
        return CheckResult.failed(
            FRESHNESS, f"report answers nonce {report.request_nonce.hex()}, not {nonce.hex()}"
        )
    return CheckResult.passed(FRESHNESS, f"request_nonce is the nonce you sent ({nonce.hex()})")


def check_signing_key(report: AttestationReport) -> CheckResult:
    """Every key field derives from, or is checked against, the identity report_data binds."""
    if report.signing_algo == "ed25519":
        # report_data binds the ed25519 key itself; the report's ecdsa address is another key,
        # which this quote does not bind, so it is never reported as attested.
        return CheckResult.passed(
            SIGNING_KEY,
            f"ed25519 public key {report.signing_public_key.hex()} (the report's ecdsa address "
            f"{report.signing_address} is not bound by this quote)",
        )
    try:
        derived = checksum_address(address_of(coincurve.PublicKey(report.signing_public_key)))
    except ValueError as exc:
        return CheckResult.failed(SIGNING_KEY, f"signing_public_key is not a secp256k1 point: {exc}")
    if derived.lower() != report.signing_address.lower():
        return CheckResult.failed(
            SIGNING_KEY, f"signing_public_key belongs to {derived}, not to {report.signing_address}"
        )
    return CheckResult.passed(SIGNING_KEY, f"signing_public_key is the key of {derived}")


def check_report_data(
    report: AttestationReport, actual: bytes, nonce: bytes, *, tls_layout: bool | None = None
) -> CheckResult:
    """report_data binds the key and the nonce; with a TLS fingerprint, nearai's layout binds it too.

    ``tls_layout`` True requires the TLS layout (the caller asked include_tls_fingerprint=true),
    False requires the plain one, None accepts whichever the report's fields produce.
    """
    who = report.signing_address if report.signing_algo == "ecdsa" else report.signing_public_key.hex()
    spki = bytes.fromhex(report.tls_cert_fingerprint) if report.tls_cert_fingerprint else None
    if spki is not None and tls_layout is not False:
        with_tls = report_data_for_tls(report.identity, spki, nonce)
        if hmac.compare_digest(with_tls, actual):
            return CheckResult.passed(
                REPORT_DATA,
                f"binds {report.signing_algo} key {who}, TLS SPKI {spki.hex()} and nonce {nonce.hex()}",
            )
        if tls_layout:
            return CheckResult.failed(
                REPORT_DATA, explain_report_data_mismatch(with_tls, actual, "tls") or "report_data mismatch"
            )
    elif tls_layout:
        return CheckResult.failed(
            REPORT_DATA, "asked for the TLS layout, but the report names no TLS fingerprint"
        )
    expected = report_data_for(report.signing_algo, report.identity, nonce)
    problem = explain_report_data_mismatch(expected, actual, report.signing_algo)
    if problem is not None:
        return CheckResult.failed(REPORT_DATA, problem)
    return CheckResult.passed(REPORT_DATA, f"binds {report.signing_algo} key {who} and nonce {nonce.hex()}")


def check_tls_fingerprint(report: AttestationReport, claims: RuntimeClaims | None) -> CheckResult:
    """tls_fingerprint: the report's TLS SPKI is the one this boot recorded in RTMR3 (keyset)."""
    if claims is None or claims.keyset is None:
        return CheckResult.skipped(TLS_FINGERPRINT, "no keyset event to compare with")
    recorded = claims.keyset.get("tls_spki_sha256")
    if report.tls_cert_fingerprint is None:
        if recorded:
            return CheckResult.failed(
                TLS_FINGERPRINT,
                f"RTMR3 records TLS SPKI {recorded}, but the report names no tls_cert_fingerprint",
            )
        return CheckResult.passed(TLS_FINGERPRINT, "no TLS: the server serves plain HTTP (keyset: tls off)")
    if not _same(recorded, report.tls_cert_fingerprint):
        return CheckResult.failed(
            TLS_FINGERPRINT, f"report names TLS SPKI {report.tls_cert_fingerprint}, RTMR3 recorded {recorded}"
        )
    return CheckResult.passed(
        TLS_FINGERPRINT, f"TLS SPKI {recorded} ({claims.keyset.get('tls_mode')}) recorded at boot in RTMR3"
    )


def check_mrconfigid(claims: RuntimeClaims | None, mrconfigid: bytes) -> CheckResult:
    """On dstack, MRCONFIGID (set by the host at launch, signed in the TD report) is 01 ‖ compose_hash."""
    if claims is None:
        return CheckResult.skipped(MRCONFIGID, "event log not verified")
    compose = claims.platform.get("compose-hash")
    if not claims.dstack:
        detail = f"no dstack platform events: MRCONFIGID {mrconfigid.hex()[:16]}… is not tied to a compose"
        return CheckResult.skipped(MRCONFIGID, detail, required=False)
    if compose is None or len(compose) != 32:
        return CheckResult.failed(MRCONFIGID, "dstack platform events carry no 32-byte compose-hash")
    if not hmac.compare_digest(mrconfigid, mrconfigid_for(compose)):
        return CheckResult.failed(
            MRCONFIGID,
            f"MRCONFIGID {mrconfigid.hex()} is not 01 ‖ compose_hash {compose.hex()} ‖ 00×15: the host "
            "launched another compose than the one RTMR3 records",
        )
    return CheckResult.passed(MRCONFIGID, f"01 ‖ compose_hash {compose.hex()} ‖ 00×15, as launched")


def _same(a: object, b: object) -> bool:
    return (
        isinstance(a, str)
        and isinstance(b, str)
        and a.lower().removeprefix("0x") == b.lower().removeprefix("0x")
    )


def check_runtime_claims(
    report: AttestationReport, claims: RuntimeClaims | None, model: str | None
) -> list[CheckResult]:
    """keyset_event, model_event, image_event: the report's claims against what RTMR3 measured."""
    if claims is None:
        skip = "event log not verified, so nothing it records can be relied on"
        return [CheckResult.skipped(n, skip) for n in (KEYSET_EVENT, MODEL_EVENT, IMAGE_EVENT)]
    return [_key_event(report, claims), _model_event(report, claims, model), _image_event(report, claims)]


def _key_event(report: AttestationReport, claims: RuntimeClaims) -> CheckResult:
    key = claims.keyset
    if key is None:
        return CheckResult.failed(
            KEYSET_EVENT, "no signing-key event in RTMR3: the key is not tied to the measured boot"
        )
    if report.signing_algo == "ecdsa":
        field, wanted = "address", report.signing_address
    else:
        field, wanted = "ed25519_public_key", report.signing_public_key.hex()
    if not _same(key.get(field), wanted):
        return CheckResult.failed(KEYSET_EVENT, f"RTMR3 measured key {key.get(field)}, not {wanted}")
    return CheckResult.passed(
        KEYSET_EVENT,
        f"RTMR3 measured this key (epoch {key.get('epoch')}, source {key.get('key_source')})",
    )


def _model_event(report: AttestationReport, claims: RuntimeClaims, model: str | None) -> CheckResult:
    name, root = report.info.get("model"), report.info.get("model_weights_root")
    measured = {n: str(m.get("root")) for n, m in claims.models.items()}
    if model is not None and name != model:
        return CheckResult.failed(MODEL_EVENT, f"report is for model {name!r}, you asked for {model!r}")
    if not isinstance(name, str) or name not in measured:
        return CheckResult.failed(
            MODEL_EVENT,
            f"RTMR3 measured weights for {sorted(measured) or 'no model'}, info.model is {name!r}",
        )
    if not _same(measured[name], root):
        return CheckResult.failed(
            MODEL_EVENT, f"RTMR3 measured weights root {measured[name]} for {name}, info says {root}"
        )
    return CheckResult.passed(MODEL_EVENT, f"{name}: weights root {measured[name]} measured in RTMR3")


def _image_event(report: AttestationReport, claims: RuntimeClaims) -> CheckResult:
    digest = report.info.get("image_digest")
    if claims.image is None:
        if digest:
            return CheckResult.failed(IMAGE_EVENT, f"info claims image {digest} but RTMR3 has no image event")
        return CheckResult.failed(IMAGE_EVENT, "RTMR3 has no tee-inference image event")
    measured = claims.image.get("image_digest")
    if measured != digest:
        return CheckResult.failed(IMAGE_EVENT, f"RTMR3 measured image {measured}, info says {digest}")
    if measured is None:
        # Honest, but nothing to pin: the server was not started from a built image.
        return CheckResult.passed(
            IMAGE_EVENT, "RTMR3 records no image digest: not started from a built image"
        )
    return CheckResult.passed(IMAGE_EVENT, f"image {measured} measured in RTMR3")


def check_simulated(info: Mapping[str, Any], quote_sim: bool, gpu_sim: bool, allowed: bool) -> CheckResult:
    label = info.get("simulated")
    parts = f"quote {'SIMULATED' if quote_sim else 'hardware'}, GPU {'SIMULATED' if gpu_sim else 'hardware'}"
    if quote_sim or gpu_sim:
        if label is not True:
            return CheckResult.failed(
                SIMULATED, f"{parts}, but info.simulated is {label!r}: the report mislabels itself"
            )
        if not allowed:
            return CheckResult.failed(
                SIMULATED,
                f"{parts}: made by a simulator, not TDX/H100 hardware; pass --allow-simulated to accept "
                "it for testing",
            )
        return CheckResult.passed(SIMULATED, f"{parts}: accepted by --allow-simulated; NOT hardware-backed")
    if label is True:
        return CheckResult.failed(
            SIMULATED, "info.simulated is true but the evidence chains to Intel/NVIDIA roots"
        )
    return CheckResult.passed(SIMULATED, "hardware evidence: no SIMULATED roots")


def summarize_nodes(others: Sequence[tuple[str, bool, str]]) -> CheckResult:
    """all_attestations: (node label, ok, first problem) for every node other than the one answering."""
    bad = [f"{label}: {problem}" for label, ok, problem in others if not ok]
    if bad:
        return CheckResult.failed("all_attestations", "; ".join(bad))
    if not others:
        return CheckResult.passed("all_attestations", "single node: this report is the only attestation")
    return CheckResult.passed(
        "all_attestations",
        f"{len(others)} other node(s), each verified on its own quote, key and GPUs for the same nonce",
    )
