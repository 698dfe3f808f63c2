"""`tee-inference bench`: the signing layer's cost as ratios against the bare engine (bench.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from tee_inference.commands import Subparsers


def add_parser(commands: Subparsers) -> None:
    bench = commands.add_parser("bench", help="measure the signing overhead against the bare fake engine")
    bench.add_argument("--seconds", type=float, default=4.0, help="time per measurement pair")
    bench.add_argument("--tokens", type=int, default=64, help="tokens per completion")
    bench.add_argument("--concurrency", type=int, default=8, help="concurrent HTTP clients")
    bench.add_argument("--only", choices=["sign", "asgi", "http"], action="append", help="run only these")
    bench.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("tee_inference").setLevel(logging.WARNING)
    selected = args.only or ["sign", "asgi", "http"]
    from tee_inference.bench import bench_asgi, bench_http, bench_sign

    steps: dict[str, Callable[[], Any]] = {
        "sign": lambda: bench_sign(args.seconds),
        "asgi": lambda: bench_asgi(args.seconds, args.tokens),
        "http": lambda: bench_http(args.seconds, args.tokens, args.concurrency),
    }
    report = {"tokens": args.tokens, "concurrency": args.concurrency, "cpus": os.cpu_count()}
    for name in selected:
        report[name] = steps[name]()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"tee-inference bench: {args.tokens} tokens per completion, {os.cpu_count()} CPUs")
    if "sign" in report:
        s = report["sign"]
        print(f"  sign      ecdsa+ed25519 {s['sign_both_us']} µs per completion "
              f"(sha256 of 512 B: {s['hash_512b_us']} µs)")  # fmt: skip
    if "asgi" in report:
        for key, r in report["asgi"].items():
            print(f"  asgi      {key:6} baseline {r['baseline_us']} µs, signed {r['signed_us']} µs "
                  f"(+{r['overhead_us']} µs per request), ratio {r['ratio']}")  # fmt: skip
    if "http" in report:
        for key, r in report["http"].items():
            print(f"  http      {key:6} rps ratio {r['rps_ratio']}, p50 ratio {r['p50_ratio']} "
                  f"(baseline {r['baseline']['rps']} rps p50 {r['baseline']['p50_ms']} ms; "
                  f"signed {r['signed']['rps']} rps p50 {r['signed']['p50_ms']} ms, "
                  f"ttfb {r['signed']['ttfb_p50_ms']} ms vs {r['baseline']['ttfb_p50_ms']} ms)")  # fmt: skip
    return 0
