"""The `tee-inference` command: a thin layer that parses arguments and calls the library.

Each command lives in one module (`commands/`, and `verify/cli.py` for the verifier) with an
`add_parser` and a `run`. Every refusal the package raises on purpose is a `TeeInferenceError`,
caught here once: one line on stderr (one per reason for a refused start), the error's exit code,
never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from tee_inference import __version__
from tee_inference.commands import bench, gateway, keys, measure, serve
from tee_inference.exceptions import StartRefused, TeeInferenceError
from tee_inference.logformat import log_handler
from tee_inference.verify import cli as verify

COMMANDS: tuple[ModuleType, ...] = (serve, gateway, keys, verify, measure, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tee-inference",
        description="Signed, attested OpenAI-compatible inference for TDX confidential VMs.",
    )
    parser.add_argument("--version", action="version", version=f"tee-inference {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        before = set(subparsers.choices)
        command.add_parser(subparsers)
        for name in set(subparsers.choices) - before:
            subparsers.choices[name].set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # LOG_FORMAT on stderr, as basicConfig(format=...) would; the date made once a second, since
    # `serve` writes an access line per request through this handler.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, handlers=[log_handler(sys.stderr)]
    )
    # httpx logs every request at INFO: noise for the CLI, and URLs carry nonces.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.run(args))
    except StartRefused as exc:
        for reason in exc.reasons:
            print(f"tee-inference: refusing to start: {reason}", file=sys.stderr)
        return exc.exit_code
    except TeeInferenceError as exc:
        print(f"tee-inference: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"tee-inference: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
