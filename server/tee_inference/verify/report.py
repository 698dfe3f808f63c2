"""The attestation report (SPEC §3) as input: its typed form and the checks that bind its parts.

The quote proves a TD with certain measurements produced ``report_data``; these checks tie the
rest of the report to it: the signing key (report_data and the RTMR3 signing-key event), the
model and image (RTMR3 events against ``info``), and the simulation label.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Any

import coincurve

from tee_inference.attestation.report import AttestationReport
from tee_inference.attestation.report_data import explain_report_data_mismatch, report_data_for
from tee_inference.signing import address_of, checksum_address
from tee_inference.verify.events import RuntimeClaims
from tee_inference.verify.results import CheckResult

REPORT_FORMAT, REPORT_DATA, SIGNING_KEY = "report_format", "report_data", "signing_key"
SIGNING_KEY_EVENT, MODEL_EVENT, IMAGE_EVENT = "signing_key_event", "model_event", "image_event"
FRESHNESS, SIMULATED = "freshness", "simulated"


def parse_report(obj: Any) -> tuple[AttestationReport | None, CheckResult]:
    """The typed report, or None and a failed report_format check naming every problem."""
    report, problems = AttestationReport.parse(obj)
    if report is None:
        return None, CheckResult.failed(REPORT_FORMAT, "; ".join(problems) or "not a report")
    return report, CheckResult.passed(
        REPORT_FORMAT, f"{report.signing_algo} report for nonce {report.request_nonce.hex()}"
    )


def check_freshness(report: AttestationReport, nonce: bytes | None) -> CheckResult:
    if nonce is None:
        return CheckResult.skipped(
            FRESHNESS,
            "no --nonce given: checked against the report's own request_nonce, so this report "
            "could be a replay",
            required=False,
        )
    if not hmac.compare_digest(nonce, report.request_nonce):
        return CheckResult.failed(
            FRESHNESS, f"report answers nonce {report.request_nonce.hex()}, not {nonce.hex()}"
        )
    return CheckResult.passed(FRESHNESS, f"request_nonce is the nonce you sent ({nonce.hex()})")


def check_signing_key(report: AttestationReport) -> CheckResult:
    """The public key the report shows must be the one behind the address it claims."""
    if report.signing_algo == "ed25519":
        return CheckResult.passed(SIGNING_KEY, f"ed25519 public key {report.signing_public_key.hex()}")
    try:
        derived = checksum_address(address_of(coincurve.PublicKey(report.signing_public_key)))
    except ValueError as exc:
        return CheckResult.failed(SIGNING_KEY, f"signing_public_key is not a secp256k1 point: {exc}")
    if derived.lower() != report.signing_address.lower():
        return CheckResult.failed(
            SIGNING_KEY, f"signing_public_key belongs to {derived}, not to {report.signing_address}"
        )
    return CheckResult.passed(SIGNING_KEY, f"signing_public_key is the key of {derived}")


def check_report_data(report: AttestationReport, actual: bytes, nonce: bytes) -> CheckResult:
    expected = report_data_for(report.signing_algo, report.identity, nonce)
    problem = explain_report_data_mismatch(expected, actual, report.signing_algo)
    if problem is not None:
        return CheckResult.failed(REPORT_DATA, problem)
    who = report.signing_address if report.signing_algo == "ecdsa" else report.signing_public_key.hex()
    return CheckResult.passed(REPORT_DATA, f"binds {report.signing_algo} key {who} and nonce {nonce.hex()}")


def _same(a: object, b: object) -> bool:
    return (
        isinstance(a, str)
        and isinstance(b, str)
        and a.lower().removeprefix("0x") == b.lower().removeprefix("0x")
    )


def check_runtime_claims(
    report: AttestationReport, claims: RuntimeClaims | None, model: str | None
) -> list[CheckResult]:
    """signing_key_event, model_event, image_event: the report's claims against what RTMR3 measured."""
    if claims is None:
        skip = "event log not verified, so nothing it records can be relied on"
        return [CheckResult.skipped(n, skip) for n in (SIGNING_KEY_EVENT, MODEL_EVENT, IMAGE_EVENT)]
    out = []
    key_field = "address" if report.signing_algo == "ecdsa" else "ed25519_public_key"
    wanted = report.signing_address if report.signing_algo == "ecdsa" else report.signing_public_key.hex()
    matches = [
        k
        for k in claims.signing_keys
        if _same(k.get(key_field), wanted) and _same(k.get("address"), report.signing_address)
    ]
    if matches:
        k = matches[-1]
        out.append(CheckResult.passed(
            SIGNING_KEY_EVENT,
            f"RTMR3 measured this key (epoch {k.get('epoch')}, source {k.get('key_source')})",
        ))  # fmt: skip
    elif claims.signing_keys:
        seen = ", ".join(str(k.get(key_field)) for k in claims.signing_keys)
        out.append(CheckResult.failed(SIGNING_KEY_EVENT, f"RTMR3 measured key(s) {seen}, not {wanted}"))
    else:
        out.append(
            CheckResult.failed(
                SIGNING_KEY_EVENT, "no signing-key event in RTMR3: the key is not tied to the measured boot"
            )
        )
    name, root = report.info.get("model"), report.info.get("model_weights_root")
    measured = {str(m.get("model")): str(m.get("root")) for m in claims.models}
    if model is not None and name != model:
        out.append(CheckResult.failed(MODEL_EVENT, f"report is for model {name!r}, you asked for {model!r}"))
    elif not isinstance(name, str) or name not in measured:
        out.append(
            CheckResult.failed(
                MODEL_EVENT,
                f"RTMR3 measured weights for {sorted(measured) or 'no model'}, info.model is {name!r}",
            )
        )
    elif not _same(measured[name], root):
        out.append(
            CheckResult.failed(
                MODEL_EVENT, f"RTMR3 measured weights root {measured[name]} for {name}, info says {root}"
            )
        )
    else:
        out.append(
            CheckResult.passed(MODEL_EVENT, f"{name}: weights root {measured[name]} measured in RTMR3")
        )
    digest = report.info.get("image_digest")
    images = [str(i.get("image_digest")) for i in claims.images]
    if not images and digest:
        out.append(
            CheckResult.failed(IMAGE_EVENT, f"info claims image {digest} but RTMR3 has no image event")
        )
    elif not images:
        out.append(
            CheckResult.skipped(IMAGE_EVENT, "no image event in RTMR3 (not a built image)", required=False)
        )
    elif digest is not None and digest != images[-1]:
        out.append(CheckResult.failed(IMAGE_EVENT, f"RTMR3 measured image {images[-1]}, info says {digest}"))
    else:
        out.append(CheckResult.passed(IMAGE_EVENT, f"image {images[-1]} measured in RTMR3"))
    out += [CheckResult.failed(MODEL_EVENT, p) for p in claims.problems]
    return out


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


def summarize_nodes(results: Sequence[tuple[str, bool, str]]) -> CheckResult:
    """all_attestations: (node label, ok, first problem) for each other node."""
    if not results:
        return CheckResult.passed("all_attestations", "single node: this report is the only attestation")
    bad = [f"{label}: {problem}" for label, ok, problem in results if not ok]
    if bad:
        return CheckResult.failed("all_attestations", "; ".join(bad))
    return CheckResult.passed(
        "all_attestations", f"{len(results)} other node(s) verified with the same nonce"
    )
