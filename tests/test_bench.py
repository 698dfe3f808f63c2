"""`tee-inference bench --quick` runs and its output is well formed. Nothing here judges a number:
benchmarks are never timed assertions (they would fail on a loaded machine, and pass on a fast
one for the wrong reasons)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tee_inference.cli import main


def test_quick_bench_writes_a_well_formed_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--json", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["http"] == printed["http"] and written["cost"] == printed["cost"]

    cost = printed["cost"]
    assert set(cost["shapes"]) == {"whole-small", "whole-64k", "stream-small", "stream-64k"}
    for shape in cost["shapes"].values():
        for part in ("bare", "signed", "added", "floor"):
            assert shape[part]["min"] <= shape[part]["median"] <= shape[part]["max"]
    assert cost["shapes"]["stream-64k"]["response_bytes"] >= 64 << 10
    assert cost["shapes"]["whole-64k"]["response_bytes"] >= 64 << 10
    for key in ("added_per_request_us", "floor_per_request_us", "added_per_event_us", "added_per_stream_us"):
        assert isinstance(cost["summary"][key], float)

    http = printed["http"]
    assert http["generator"] == "python raw-socket client"
    assert set(http["scenarios"]) == {
        "whole-small c=1",
        "whole-small c=16",
        "stream-small c=1",
        "stream-small c=16",
    }
    for scenario in http["scenarios"].values():
        rows = scenario["targets"]
        assert list(rows) == ["engine", "in-process", "proxy", "passthrough"]
        for row in rows.values():
            assert row["errors"] == 0
            assert row["rps"]["median"] > 0 and row["p50_ms"]["median"] <= row["p99_ms"]["median"]
            assert row["ttfb_c1_ms"]["median"] > 0
        assert rows["engine"]["rps_vs_engine"] == 1.0
    assert set(http["targets"]) == set(http["scenarios"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib" in printed["chart"]


def test_the_table_names_every_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--only", "http", "--concurrency", "1"]) == 0
    table = capsys.readouterr().out
    for name in ("engine", "in-process", "proxy", "passthrough", "rps_vs_passthrough"):
        assert name in table


@pytest.mark.parametrize("bad", ["phala", "phala=", "=http://x", "phala=ftp://x"])
def test_compare_wants_name_equals_url(bad: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--compare", bad])
    assert exit_.value.code == 2


def test_wrk_drives_the_load_where_installed(capsys: pytest.CaptureFixture[str]) -> None:
    # `make test` installs wrk (scripts/system-deps.sh), so the generator capacity figures come
    # from is exercised too, not only the raw-socket client `--quick` picks.
    assert (
        main(["bench", "--only", "http", "--generator", "wrk", "--quick", "--concurrency", "16", "--json"])
        == 0
    )
    http = json.loads(capsys.readouterr().out)["http"]
    assert http["generator"].startswith("wrk")
    for scenario in http["scenarios"].values():
        for row in scenario["targets"].values():
            assert row["errors"] == 0 and row["rps"]["median"] > 0
