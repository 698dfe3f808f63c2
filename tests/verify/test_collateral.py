"""Collateral per platform: a report's nodes may run on CPUs of different FMSPC, each checked with its own."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tee_inference.cli import main
from tee_inference.exceptions import VerificationError
from tee_inference.verify import Status, VerificationPolicy, Verifier, parse_collateral
from tee_inference.verify.collateral import (
    collateral_for,
    collateral_platform,
    distinct_platforms,
    fetch_collaterals,
    quote_platform,
)

NOW = 1750400000  # inside the sample collateral's window


@pytest.fixture(scope="module")
def sample_text(vectors: Path) -> str:
    return (vectors / "tdx/dcap_qvl_sample_collateral.json").read_text()


def _for_fmspc(text: str, fmspc: str) -> Any:
    """The sample collateral relabelled for another FMSPC (its signature no longer holds: never used)."""
    document = json.loads(text)
    tcb = json.loads(document["tcb_info"])
    tcb["fmspc"] = fmspc
    document["tcb_info"] = json.dumps(tcb)
    return parse_collateral(json.dumps(document))


def test_platforms_of_real_quotes_and_collateral(vectors: Path, sample_text: str) -> None:
    assert quote_platform((vectors / "tdx/dcap_qvl_sample_quote.bin").read_bytes()) == (
        "B0C06F000000",
        "platform",
    )
    assert quote_platform((vectors / "tdx/nearai_e2e_quote.bin").read_bytes()) == ("90C06F000000", "platform")
    assert collateral_platform(parse_collateral(sample_text)) == ("B0C06F000000", "platform")
    assert quote_platform(b"not a quote") is None
    assert collateral_platform(object()) is None


def test_each_quote_gets_its_own_platforms_collateral(vectors: Path, sample_text: str) -> None:
    sample_quote = (vectors / "tdx/dcap_qvl_sample_quote.bin").read_bytes()
    other, sample = _for_fmspc(sample_text, "90C06F000000"), parse_collateral(sample_text)
    assert collateral_for(sample_quote, [other, sample]) is sample
    assert collateral_for(sample_quote, (sample, other)) is sample
    assert collateral_for(sample_quote, sample) is sample
    assert collateral_for(sample_quote, []) is None
    # None fits: the first is used, so that the quote check names the mismatch.
    assert collateral_for(sample_quote, [other]) is other


def test_verify_quote_with_collateral_for_several_platforms(vectors: Path, sample_text: str) -> None:
    verifier = Verifier.production()
    sample_quote = (vectors / "tdx/dcap_qvl_sample_quote.bin").read_bytes()
    both = [_for_fmspc(sample_text, "90C06F000000"), parse_collateral(sample_text)]
    result = verifier.verify_quote(sample_quote, VerificationPolicy(), collateral=both, now=NOW)
    assert result.ok, result.blocking
    assert result.check("tcb_status").status is Status.PASS
    # The other platform's quote against a set with nothing for it: the mismatch, named.
    nearai = (vectors / "tdx/nearai_e2e_quote.bin").read_bytes()
    result = verifier.verify_quote(nearai, VerificationPolicy(), collateral=[both[1]], now=NOW)
    assert result.check("tcb_status").status is Status.FAIL
    assert "PCK certificate is for 90C06F000000" in result.check("tcb_status").detail


def test_cli_takes_one_collateral_per_platform(
    vectors: Path, sample_text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.json"
    other.write_text(_for_fmspc(sample_text, "90C06F000000").to_json())
    quote, sample = vectors / "tdx/dcap_qvl_sample_quote.bin", vectors / "tdx/dcap_qvl_sample_collateral.json"
    argv = ["verify", "quote", str(quote), "--now", str(NOW)]
    assert main([*argv, "--collateral", str(other), "--collateral", str(sample)]) == 0
    assert "UpToDate" in capsys.readouterr().out
    assert main([*argv, "--collateral", str(other)]) == 1
    assert "collateral is for platform FMSPC 90C06F000000" in capsys.readouterr().out


def test_pccs_is_asked_once_per_platform(vectors: Path) -> None:
    sample = (vectors / "tdx/dcap_qvl_sample_quote.bin").read_bytes()
    nearai = (vectors / "tdx/nearai_e2e_quote.bin").read_bytes()
    assert distinct_platforms([sample, nearai, sample, nearai]) == [sample, nearai]
    asked: list[tuple[str, bytes]] = []

    async def fetch(url: str, raw: bytes) -> str:
        asked.append((url, raw))
        return f"collateral for {quote_platform(raw)}"

    got = asyncio.run(fetch_collaterals("https://pccs.example", [sample, sample, nearai], fetch))
    assert asked == [("https://pccs.example", sample), ("https://pccs.example", nearai)]
    assert got == [
        "collateral for ('B0C06F000000', 'platform')",
        "collateral for ('90C06F000000', 'platform')",
    ]

    async def failing(url: str, raw: bytes) -> str:
        raise RuntimeError("connection refused")

    with pytest.raises(VerificationError, match=r"cannot fetch collateral from https://pccs\.example"):
        asyncio.run(fetch_collaterals("https://pccs.example", [sample], failing))
