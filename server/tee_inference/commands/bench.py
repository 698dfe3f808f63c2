"""`tee-inference bench`: the signing layer's cost, in process and over loopback, in one run (bench/)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from tee_inference.commands import Subparsers
from tee_inference.exceptions import ConfigError


def _pair(value: str) -> tuple[str, str]:
    name, sep, url = value.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected NAME=URL (an http(s) URL), got {value!r}")
    return name, url.rstrip("/")


def _header(value: str) -> tuple[str, str]:
    name, sep, content = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {value!r}")
    return name.strip(), content.strip()


def _counts(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("concurrencies must be at least 1")
    return counts


def add_parser(commands: Subparsers) -> None:
    bench = commands.add_parser(
        "bench", help="measure the signing layer against the bare engine, a pass-through proxy and peers"
    )
    bench.add_argument("--only", choices=["cost", "http"], action="append", help="run only these parts")
    bench.add_argument("--seconds", type=float, default=2.0, help="seconds per load run (wrk: whole seconds)")
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians and spreads)")
    bench.add_argument(
        "--concurrency", type=_counts, default=(1, 16, 64), help="comma-separated, e.g. 1,16,64"
    )
    bench.add_argument(
        "--compare",
        type=_pair,
        action="append",
        default=[],
        metavar="NAME=URL",
        help="also measure a peer already serving at URL (against the engine at --engine-port)",
    )
    bench.add_argument(
        "--engine-port", type=int, help="port of the benchmark engine (start peers against it)"
    )
    bench.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="add a request header to every request (a peer's bearer token, say)",
    )
    bench.add_argument("--peers-only", action="store_true", help="measure only the --compare URLs")
    bench.add_argument("--model", default=None, help="model name in the requests (with --peers-only)")
    bench.add_argument(
        "--generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator: wrk where installed (auto), or the raw-socket client",
    )
    bench.add_argument("--quick", action="store_true", help="seconds, not minutes: small answers, 1 round")
    bench.add_argument("--out", type=Path, help="write bench.json and bench.png into this directory")
    bench.add_argument("--json", action="store_true", help="print the JSON document instead of the table")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("tee_inference").setLevel(logging.WARNING)
    from tee_inference.bench import cost, http, report

    if args.peers_only and not args.compare:
        raise ConfigError("--peers-only needs at least one --compare NAME=URL")
    shapes: tuple[cost.Shape, ...] = cost.SHAPES
    seconds, rounds, concurrencies = args.seconds, args.rounds, args.concurrency
    if args.quick or args.peers_only:
        # A real engine's context is too short for the 12,000-token answer, and it is slow.
        shapes = tuple(s for s in cost.SHAPES if s.name.endswith("small"))
    if args.quick:
        seconds, rounds, concurrencies = (
            min(seconds, 0.3),
            1,
            tuple(c for c in concurrencies if c <= 16) or (1,),
        )
    parts = args.only or ["cost", "http"]
    document: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
        "seconds": seconds,
        "rounds": rounds,
        "concurrency": list(concurrencies),
    }
    if "cost" in parts and not args.peers_only:
        # Every shape, also when quick: the per-event cost is the slope between two streams.
        document["cost"] = cost.measure(
            seconds=1.5 if args.quick else 12.0, rounds=rounds if args.quick else 5
        )
    if "http" in parts:
        options = {
            "shapes": shapes,
            "concurrencies": concurrencies,
            "seconds": seconds,
            "rounds": rounds,
            "generator": "python" if args.quick and args.generator == "auto" else args.generator,
            "headers": tuple(args.header),
        }
        peers = dict(args.compare)
        if args.peers_only:
            document["http"] = http.run_http(peers, model=args.model or cost.MODEL, **options)
        else:
            with http.local_targets(args.engine_port) as targets:
                document["http"] = http.run_http({**targets, **peers}, **options)
    document["load_average_end"] = round(os.getloadavg()[0], 2)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(document, indent=2) + "\n")
        document["chart"] = report.chart(document, args.out / "bench.png") or str(args.out / "bench.png")
    print(json.dumps(document, indent=2) if args.json else report.table(document))
    if args.out is not None and not args.json:
        print(f"\nwrote {args.out / 'bench.json'}; chart: {document['chart']}")
    return 0
