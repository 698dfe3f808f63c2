"""The client's Intel collateral: tcb_status is evaluated with it, relaxed by name without it."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from support.paths import DATA
from support.servers import free_port
from support.simulated_report import SimulatedNode
from tee_inference.client import AttestationError
from tee_inference.client.session import Settings
from tee_inference.exceptions import TeeInferenceError
from tee_inference.verify.results import Status

SAMPLE_QUOTE = DATA / "vectors/tdx/dcap_qvl_sample_quote.bin"
SAMPLE_COLLATERAL = DATA / "vectors/tdx/dcap_qvl_sample_collateral.json"


def _settings(**options: Any) -> Settings:
    return Settings.for_client(
        "http://127.0.0.1:1", "sim-model", None, allow_unmeasured=True, allow_simulated=False,
        allow_plaintext=True, signing_algo="ecdsa", api_key=None, verifier=None, encrypt=False, **options,
    )  # fmt: skip


def _report_with_real_quote() -> tuple[bytes, bytes]:
    """A report whose quote is a genuine Intel-signed one (it binds nothing of ours)."""
    nonce = os.urandom(32)
    report = SimulatedNode().report(nonce)
    quote = SAMPLE_QUOTE.read_bytes().hex()
    report["intel_quote"] = quote
    report["all_attestations"][0]["intel_quote"] = quote
    return json.dumps(report).encode(), nonce


def _check(
    name: str, settings: Settings, body: bytes, nonce: bytes, collateral: Any
) -> tuple[Status, bool, str]:
    with pytest.raises(AttestationError) as caught:  # report_data binds nothing: it never passes
        settings.judge(200, body, nonce, None, collateral)
    result = caught.value.result
    (check,) = [c for c in result.checks if c.name == name]
    return check.status, check in result.blocking, check.detail


def _tcb(settings: Settings, body: bytes, nonce: bytes, collateral: Any) -> tuple[Status, bool, str]:
    return _check("tcb_status", settings, body, nonce, collateral)


def test_without_collateral_tcb_status_blocks() -> None:
    body, nonce = _report_with_real_quote()
    settings = _settings()
    status, blocking, detail = _tcb(settings, body, nonce, settings.collateral.for_report_sync(body))
    assert status is Status.SKIP and blocking
    assert "collateral" in detail


def test_allow_missing_collateral_relaxes_tcb_status_by_name() -> None:
    body, nonce = _report_with_real_quote()
    settings = _settings(allow_missing_collateral=True)
    status, blocking, _ = _tcb(settings, body, nonce, None)
    assert status is Status.SKIP and not blocking
    assert "tcb_status" in settings.policy.relax


@pytest.mark.parametrize("source", [SAMPLE_COLLATERAL, "object"])
def test_collateral_is_handed_to_the_quote_check(source: Path | str) -> None:
    from tee_inference.verify import parse_collateral

    body, nonce = _report_with_real_quote()
    given = parse_collateral(SAMPLE_COLLATERAL.read_text()) if source == "object" else source
    settings = _settings(collateral=given)
    collateral = settings.collateral.for_report_sync(body)
    assert collateral is not None
    # dcap-qvl ran with it: the sample collateral's CRLs expired in 2026, which it reports, and
    # tcb_status is then not evaluated (rather than skipped for want of collateral).
    status, _, detail = _check("quote_signature", settings, body, nonce, collateral)
    assert status is Status.FAIL and "dcap-qvl" in detail and "Expired" in detail
    status, blocking, detail = _tcb(settings, body, nonce, collateral)
    assert blocking and detail.startswith("not evaluated")


def test_pccs_fetch_failure_is_a_clean_error() -> None:
    body, _ = _report_with_real_quote()
    settings = _settings(pccs_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TeeInferenceError, match="cannot fetch collateral"):
        settings.collateral.for_report_sync(body)
    with pytest.raises(TeeInferenceError, match="cannot fetch collateral"):
        asyncio.run(settings.collateral.for_report(body))


def test_pccs_is_not_asked_about_a_report_that_does_not_parse() -> None:
    settings = _settings(pccs_url=f"http://127.0.0.1:{free_port()}")
    assert settings.collateral.for_report_sync(b"not json") is None


def test_collateral_and_pccs_url_exclude_each_other() -> None:
    with pytest.raises(TeeInferenceError, match="not both"):
        _settings(collateral=SAMPLE_COLLATERAL, pccs_url="https://pccs.example")


def test_pccs_is_asked_for_every_nodes_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a gateway the report holds every node: their CPUs may differ, and so their collateral."""
    import dcap_qvl

    body, _ = _report_with_real_quote()
    report = json.loads(body)
    other_node = {**report["all_attestations"][0]}
    other_node["intel_quote"] = (DATA / "vectors/tdx/nearai_e2e_quote.bin").read_bytes().hex()
    report["all_attestations"].append(other_node)
    asked: list[bytes] = []

    async def get_collateral(url: str, raw: bytes) -> str:  # dcap-qvl's network call, answered here
        asked.append(raw)
        return f"collateral {len(asked)}"

    monkeypatch.setattr(dcap_qvl, "get_collateral", get_collateral)
    settings = _settings(pccs_url="https://pccs.example")
    got = settings.collateral.for_report_sync(json.dumps(report).encode())
    # The answering node's quote, listed twice (itself and its all_attestations entry), is asked once.
    assert asked == [SAMPLE_QUOTE.read_bytes(), bytes.fromhex(other_node["intel_quote"])]
    assert got == ["collateral 1", "collateral 2"]


def test_a_fixed_collateral_may_be_one_per_platform() -> None:
    settings = _settings(collateral=[SAMPLE_COLLATERAL, SAMPLE_COLLATERAL])
    fixed = settings.collateral.for_report_sync(b"{}")
    assert isinstance(fixed, list) and len(fixed) == 2
