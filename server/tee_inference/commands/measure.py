"""`tee-inference measure model DIR`: print (or check) a model directory's weights root."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import IO

from tee_inference.commands import Subparsers
from tee_inference.exceptions import MeasurementError
from tee_inference.measure import (
    ModelMeasurement,
    Progress,
    check_model,
    measure_model,
    to_json_text,
)


def add_parser(subparsers: Subparsers) -> None:
    """Add `measure model` to the main CLI's subparsers."""
    measure = subparsers.add_parser("measure", help="measure model weights (the root extended into RTMR3)")
    kinds = measure.add_subparsers(dest="measure_kind", required=True)
    model = kinds.add_parser("model", help="root hash over a model directory (see tee_inference.measure)")
    model.add_argument("dir", type=Path, metavar="DIR")
    model.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    model.add_argument("--manifest-out", type=Path, metavar="FILE", help="write the manifest text here")
    model.add_argument("--check", type=Path, metavar="MANIFEST", help="fail unless DIR matches this manifest")
    model.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out matching paths (recorded in the manifest; changes the root)",
    )
    model.add_argument("--workers", type=int, help="hashing threads (default: every core)")
    model.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


class ProgressBar:
    """A one-line stderr bar, redrawn at most ten times a second."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        fraction = done / total if total else 1.0
        filled = int(fraction * 30)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:6.1%} "
            f"{done / 2**30:.2f}/{total / 2**30:.2f} GiB"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def run(args: argparse.Namespace) -> int:
    progress: Progress | None = None
    if not args.no_progress and sys.stderr.isatty():
        progress = ProgressBar(sys.stderr)
    result: ModelMeasurement
    if args.check is not None:
        if args.exclude:
            raise MeasurementError("--exclude comes from the manifest with --check")
        try:
            expected = args.check.read_text(encoding="utf-8")
        except OSError as exc:
            raise MeasurementError(f"cannot read manifest {args.check}: {exc.strerror}") from None
        result = check_model(args.dir, expected, workers=args.workers, progress=progress)
    else:
        result = measure_model(args.dir, workers=args.workers, progress=progress, exclude=args.exclude)
    if args.manifest_out is not None:
        args.manifest_out.write_text(result.manifest_text(), encoding="utf-8")
    if args.json:
        sys.stdout.write(to_json_text(result))
    else:
        checked = " (matches manifest)" if args.check is not None else ""
        print(f"weights root: {result.root}{checked}")
        print(f"files: {len(result.files)}  bytes: {result.total_bytes}")
    return 0
