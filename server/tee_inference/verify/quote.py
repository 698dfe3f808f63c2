"""TDX quote checks: structure (our strict parser), signatures and TCB (dcap-qvl), TD attributes.

dcap-qvl does the Intel part (PCK chain with CRLs, QE identity, TCB info, validity window) and
is never re-implemented here. It ignores bytes after the signature data, so the strict parser
always runs too; and without collateral the in-quote ECDSA chain is still checked offline against
the pinned Intel root, so an offline run says what it did check and what it skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dcap_qvl
from cryptography import x509

from tee_inference.attestation.td_attributes import DEBUG, as_int, describe_attributes
from tee_inference.attestation.tdx_quote import (
    Quote,
    QuoteFormatError,
    QuoteSignatureError,
    is_simulated_quote,
    load_pck_chain,
    load_quote,
    verify_quote_ecdsa,
)
from tee_inference.verify.collateral import collateral_for, collateral_platform, quote_platform
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.results import CheckResult
from tee_inference.verify.trust import subject

QUOTE_STRUCTURE, QUOTE_SIGNATURE, TCB_STATUS, TD_ATTRIBUTES = (
    "quote_structure", "quote_signature", "tcb_status", "td_attributes",
)  # fmt: skip
SIMULATED_HINT = "pass --allow-simulated to accept simulated evidence for testing"


@dataclass(frozen=True)
class QuoteChecks:
    """The quote (when it parsed), its checks, and what dcap-qvl said."""

    quote: Quote | None
    checks: tuple[CheckResult, ...]
    simulated: bool
    tcb_status: str | None = None


def _iso(now: int) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _offline(quote: Quote, root: x509.Certificate) -> str | None:
    """None when the in-quote chain holds under ``root``, else the failing step and why."""
    try:
        verify_quote_ecdsa(quote, root)
    except QuoteSignatureError as exc:
        return str(exc)
    return None


def _simulated_checks(quote: Quote, policy: VerificationPolicy) -> list[CheckResult]:
    root = load_pck_chain(quote.pck_chain_pem or b"")[-1]
    if not policy.simulated.allowed:
        return [
            CheckResult.failed(
                QUOTE_SIGNATURE,
                f"the PCK chain ends at {subject(root)!r}: this quote comes from a simulator, not a "
                f"TDX CPU; {SIMULATED_HINT}",
            ),
            CheckResult.skipped(TCB_STATUS, "a simulated quote has no Intel TCB"),
        ]
    problem = _offline(quote, root)
    if problem:
        return [
            CheckResult.failed(QUOTE_SIGNATURE, f"simulated quote does not verify: {problem}"),
            CheckResult.skipped(TCB_STATUS, "a simulated quote has no Intel TCB", required=False),
        ]
    return [
        CheckResult.passed(
            QUOTE_SIGNATURE,
            f"SIMULATED: signed under the quote's own root {subject(root)!r} (accepted by "
            "--allow-simulated; nothing here is hardware-backed)",
        ),
        CheckResult.skipped(TCB_STATUS, "a simulated quote has no Intel TCB", required=False),
    ]


def _intel_checks(
    quote: Quote, policy: VerificationPolicy, intel_root: x509.Certificate, collateral: Any, now: int
) -> tuple[list[CheckResult], str | None]:
    offline = _offline(quote, intel_root)
    offline_text = (
        f"offline check failed: {offline}"
        if offline
        else f"offline: PCK chain to the pinned {subject(intel_root)}, QE report, attestation key and "
        "quote signature hold"
    )
    if collateral is None:
        sig = (
            CheckResult.failed(QUOTE_SIGNATURE, offline_text)
            if offline
            else CheckResult.passed(QUOTE_SIGNATURE, f"{offline_text}; CRLs not checked (no collateral)")
        )
        tcb = CheckResult.skipped(
            TCB_STATUS,
            "no collateral: give --collateral FILE or --pccs-url URL "
            "(--allow-missing-collateral accepts this skip)",
        )
        return [sig, tcb], None
    try:
        report = dcap_qvl.verify(quote.raw, collateral, now)
    except ValueError as exc:
        detail = f"dcap-qvl at {_iso(now)}: {' '.join(str(exc).split())}"  # its errors span lines
        mismatch = _fmspc_mismatch(quote, collateral)
        if mismatch is not None and not offline:
            # The quote is fine; the collateral describes another platform, so no TCB status.
            return [
                CheckResult.passed(QUOTE_SIGNATURE, f"{offline_text}; collateral not applicable"),
                CheckResult.failed(TCB_STATUS, mismatch),
            ], None
        return [
            CheckResult.failed(QUOTE_SIGNATURE, f"{detail}; {offline_text}"),
            CheckResult.skipped(TCB_STATUS, "not evaluated: the quote did not verify with the collateral"),
        ], None
    status, advisories = str(report.status), [str(a) for a in report.advisory_ids]
    if offline:
        # dcap-qvl accepted what our parser's chain check rejects: report it, never pass silently.
        sig = CheckResult.failed(QUOTE_SIGNATURE, f"dcap-qvl accepted the quote but {offline_text}")
    else:
        sig = CheckResult.passed(
            QUOTE_SIGNATURE,
            f"dcap-qvl with collateral at {_iso(now)}: PCK chain, CRLs, QE identity and signatures valid; "
            f"{offline_text}",
        )
    return [sig, policy.tcb.evaluate(status, advisories)], status


def _fmspc_mismatch(quote: Quote, collateral: Any) -> str | None:
    """A message when the collateral's TCB info is for another FMSPC than the quote's PCK certificate."""
    ours, theirs = quote_platform(quote.raw), collateral_platform(collateral)
    if ours is None or theirs is None or ours[0] == theirs[0]:
        return None
    return (
        f"the collateral is for platform FMSPC {theirs[0]}, the quote's PCK certificate is for {ours[0]}: "
        f"fetch the collateral for this platform (--pccs-url, or a file for FMSPC {ours[0]})"
    )


def check_quote(
    raw: bytes | str,
    policy: VerificationPolicy,
    *,
    intel_root: x509.Certificate,
    collateral: Any = None,
    now: int | None = None,
) -> QuoteChecks:
    """Run quote_structure, quote_signature, tcb_status and td_attributes on one quote.

    ``collateral``: one QuoteCollateralV3, or a sequence of them (one per platform: collateral.py).
    """
    try:
        quote = load_quote(raw)
    except QuoteFormatError as exc:
        skip = "quote did not parse"
        return QuoteChecks(None, (
            CheckResult.failed(QUOTE_STRUCTURE, str(exc)),
            CheckResult.skipped(QUOTE_SIGNATURE, skip), CheckResult.skipped(TCB_STATUS, skip),
            CheckResult.skipped(TD_ATTRIBUTES, skip),
        ), simulated=False)  # fmt: skip
    structure = CheckResult.passed(
        QUOTE_STRUCTURE,
        f"TDX v4, {len(quote.raw)} bytes, sig_data_len {quote.sig_data_len}, "
        f"{quote.padding_length} zero padding bytes",
    )
    simulated = is_simulated_quote(quote)
    tcb_status = None
    if simulated:
        sig_checks = _simulated_checks(quote, policy)
    else:
        when = int(time.time()) if now is None else now
        mine = collateral_for(quote.raw, collateral)
        sig_checks, tcb_status = _intel_checks(quote, policy, intel_root, mine, when)
    return QuoteChecks(
        quote, (structure, *sig_checks, check_td_attributes(quote, policy)), simulated, tcb_status
    )


def check_td_attributes(quote: Quote, policy: VerificationPolicy) -> CheckResult:
    """td_attributes: DEBUG, SEPT_VE_DISABLE, MIGRATABLE and the module's fixed bits (XFAM too)."""
    attributes, xfam = as_int(quote.td_report.td_attributes), as_int(quote.td_report.xfam)
    shown = f"attributes {describe_attributes(attributes)}, XFAM {xfam:#x}"
    problems = policy.td_attributes.problems(attributes, xfam)
    if problems:
        return CheckResult.failed(TD_ATTRIBUTES, f"{shown}: " + "; ".join(problems))
    debug = " (DEBUG allowed by policy: NOT for production)" if attributes & DEBUG else ""
    return CheckResult.passed(TD_ATTRIBUTES, f"{shown}: a production TD{debug}")
