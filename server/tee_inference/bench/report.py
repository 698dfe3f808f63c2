"""The benchmark's outputs: a text table, the JSON document, and a PNG chart.

The chart needs matplotlib, a development dependency (`pip install 'tee-inference[dev]'`): the
server and verifier installs never import it, and without it the chart is skipped with a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGET_ORDER = ("engine", "in-process", "proxy", "passthrough")


def _ordered(names: list[str]) -> list[str]:
    return [n for n in TARGET_ORDER if n in names] + [n for n in names if n not in TARGET_ORDER]


def table(report: dict[str, Any]) -> str:
    lines = [f"tee-inference bench: {report['cpus']} CPUs, load average {report['load_average']} at start"]
    cost = report.get("cost")
    if cost is not None:
        s = cost["summary"]
        lines += [
            "",
            "CPU cost in process (middleware built as vLLM builds it, canned fake engine; CPU µs, median of "
            f"{cost['rounds']} rounds):",
            f"  {'answer':14} {'bytes out':>9} {'events':>6} {'engine':>9} {'+middleware':>12} "
            f"{'floor':>8} {'added/floor':>11}",
        ]
        for name, shape in cost["shapes"].items():
            added, floor, bare = shape["added"]["median"], shape["floor"]["median"], shape["bare"]["median"]
            lines.append(
                f"  {name:14} {shape['response_bytes']:>9} {shape['events']:>6} {bare:>9.1f} "
                f"{added:>+12.1f} {floor:>8.1f} {added / floor if floor else 0:>11.2f}"
            )
        lines.append(
            f"  per request: +{s.get('added_per_request_us')} µs over a {s.get('floor_per_request_us')} µs "
            f"floor ({s.get('added_over_floor')}x); per streamed event: +{s.get('added_per_event_us')} µs "
            f"(floor {s.get('floor_per_event_us')} µs); per stream: +{s.get('added_per_stream_us')} µs"
        )
    http = report.get("http")
    if http is not None:
        lines += ["", f"HTTP over loopback ({http['generator']}; median of rounds, [min-max] of req/s):"]
        header = (
            f"  {'target':14} {'req/s':>9} {'[min-max]':>17} {'x engine':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'ttfb c=1':>9}"
        )
        for key, scenario in http["scenarios"].items():
            lines += ["", f"  {key}", header]
            rows = scenario["targets"]
            for name in _ordered(list(rows)):
                row = rows[name]
                rps, ttfb = row["rps"], row["ttfb_c1_ms"]
                spread = f"[{rps['min']:.0f}-{rps['max']:.0f}]"
                errors = f"  {row['errors']} errors" if row["errors"] else ""
                vs_engine = "-" if row["rps_vs_engine"] is None else f"{row['rps_vs_engine']:.3f}"
                lines.append(
                    f"  {name:14} {rps['median']:>9.0f} {spread:>17} {vs_engine:>8} "
                    f"{row['p50_ms']['median']:>8.2f} {row['p99_ms']['median']:>8.2f} "
                    f"{ttfb['median'] if ttfb else float('nan'):>9.2f}{errors}"
                )
        if http["targets"]:
            lines += ["", "  standalone proxy against the pass-through (and peers):"]
            for key, entry in http["targets"].items():
                rest = ", ".join(f"{k.removeprefix('proxy_')} {v}" for k, v in entry.items())
                lines.append(f"  {key:18} {rest}")
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> str | None:
    """Writes the PNG; returns why not when it cannot."""
    http = report.get("http")
    if http is None:
        return "no HTTP measurements to chart"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'tee-inference[dev]'): no chart"
    scenarios = http["scenarios"]
    keys = list(scenarios)
    names = _ordered(list(next(iter(scenarios.values()))["targets"]))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(keys) + 3), 8), sharex=True)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(keys))]
        rps = [scenarios[k]["targets"][name]["rps"]["median"] for k in keys]
        p50 = [scenarios[k]["targets"][name]["p50_ms"]["median"] for k in keys]
        top.bar(xs, rps, width, label=name)
        bottom.bar(xs, p50, width, label=name)
    top.set_yscale("log")
    top.set_ylabel("requests/s (median, log)")
    bottom.set_yscale("log")
    bottom.set_ylabel("p50 latency ms (log)")
    bottom.set_xticks(range(len(keys)))
    bottom.set_xticklabels(keys, rotation=30, ha="right")
    top.legend(ncol=len(names), fontsize="small")
    top.set_title(f"tee-inference bench ({http['generator']}, {report['cpus']} CPUs, loopback)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None
