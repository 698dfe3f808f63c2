"""Intel collateral for quotes: read, fetched, and matched to the platform of each quote.

Collateral (TCB info, QE identity, CRLs: dcap-qvl's ``QuoteCollateralV3``) is per platform: the
FMSPC of the quote's PCK certificate and the PCK CA that issued it (``platform`` or
``processor``). A gateway's nodes can run on different CPU models, so a report with
``all_attestations`` may hold quotes of several platforms; one collateral for all of them would
fail every node that is not on the first one's platform. Wherever collateral is accepted, one
object or a sequence of them (one per platform) is accepted, and each quote is checked with the
one for its own platform.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509

from tee_inference.attestation.report import AttestationReport
from tee_inference.attestation.tdx_quote import QuoteFormatError, load_quote
from tee_inference.exceptions import VerificationError

Platform = tuple[str, str]  # (FMSPC in upper-case hex, PCK CA: "platform" or "processor")


def load_collateral(source: str | Path) -> Any:
    """dcap-qvl collateral (QuoteCollateralV3) from a JSON file, or raise VerificationError."""
    try:
        text = Path(source).read_text()
    except OSError as exc:
        raise VerificationError(f"cannot read collateral {source}: {exc}") from None
    return parse_collateral(text, origin=str(source))


def parse_collateral(text: str, *, origin: str = "<text>") -> Any:
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except (ValueError, TypeError) as exc:
        raise VerificationError(f"{origin} is not QuoteCollateralV3 JSON: {exc}") from None


def quote_platform(raw_quote: bytes) -> Platform | None:
    """The platform a quote's PCK certificate names (None when dcap-qvl cannot read it)."""
    try:
        parsed = dcap_qvl.Quote.parse(raw_quote)
        return str(parsed.fmspc()).upper(), str(parsed.ca()).lower()
    except (ValueError, TypeError, AttributeError):
        return None


def collateral_platform(collateral: Any) -> Platform | None:
    """The platform a collateral describes: its TCB info's FMSPC and its PCK CRL's issuer."""
    try:
        fmspc = str(json.loads(collateral.tcb_info)["fmspc"]).upper()
        issuer = x509.load_pem_x509_certificates(collateral.pck_crl_issuer_chain.encode())[0]
        names = issuer.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None
    common_name = str(names[0].value) if names else ""
    ca = next((kind for kind in ("platform", "processor") if kind in common_name.lower()), "")
    return fmspc, ca


def collateral_for(raw_quote: bytes, collateral: Any) -> Any:
    """The collateral to check this quote with, out of one object or a sequence (one per platform).

    With a sequence, the one for the quote's platform; if none is, the first, so that the quote
    check names the mismatch (``tcb_status``) instead of reporting no collateral at all.
    """
    if not isinstance(collateral, list | tuple):
        return collateral
    if not collateral:
        return None
    wanted = quote_platform(raw_quote)
    fitting = (c for c in collateral if wanted is not None and collateral_platform(c) == wanted)
    return next(fitting, collateral[0])


def report_quotes(report: AttestationReport) -> list[bytes]:
    """The raw quote of every node of a report: the answering one's, then all_attestations'.

    A quote that does not parse is left out: the quote check reports it, and no PCCS is asked.
    """
    quotes = []
    for node in (report, *report.all_attestations):
        try:
            quotes.append(load_quote(node.intel_quote).raw)
        except QuoteFormatError:
            continue
    return quotes


def distinct_platforms(raw_quotes: Iterable[bytes]) -> list[bytes]:
    """One quote per platform among these, in order: what a PCCS has to be asked about."""
    seen: set[Platform | None] = set()
    out = []
    for raw in raw_quotes:
        platform = quote_platform(raw)
        if platform not in seen:
            seen.add(platform)
            out.append(raw)
    return out


Fetch = Callable[[str, bytes], Awaitable[Any]]


async def fetch_collaterals(
    pccs_url: str, raw_quotes: Sequence[bytes], fetch: Fetch | None = None
) -> list[Any]:
    """The collateral of every platform among these quotes, from a PCCS (or Intel's PCS).

    ``fetch`` is dcap-qvl's ``get_collateral`` unless given; one request per platform, not per
    quote. Raises VerificationError, naming the PCCS, when one cannot be had.
    """
    get = fetch or dcap_qvl.get_collateral
    out = []
    for raw in distinct_platforms(raw_quotes):
        try:
            out.append(await get(pccs_url, raw))
        except (ValueError, RuntimeError, OSError) as exc:
            raise VerificationError(f"cannot fetch collateral from {pccs_url}: {exc}") from None
    return out


def fetch_collaterals_sync(pccs_url: str, raw_quotes: Sequence[bytes]) -> list[Any]:
    """``fetch_collaterals`` for synchronous callers (outside an event loop)."""
    return asyncio.run(fetch_collaterals(pccs_url, raw_quotes))
