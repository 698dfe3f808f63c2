#!/usr/bin/env python3
"""Provision model weights before the server starts, and refuse anything but the measured ones.

    fetch-model --manifest M --dest DIR --url-env VAR [--expect-weights-root HEX]

Runs as the compose's one-shot ``weights`` service (image/app-compose.json), inside the CVM, with
the image's own Python and no third-party package. The measured step is this file (it is in the
image, so the image digest covers it), the manifest next to it (``/opt/tee-inference/models``,
written by ``tee-inference measure model``) and the compose line that names them and the expected
root. Where the bytes come from does not matter: the URL (``$VAR``, passed through dstack's
encrypted environment because a pre-signed URL is a credential) only says where to look.

1. ``sha256(manifest) == --expect-weights-root``, or nothing is fetched: the manifest is what the
   root measures (tee_inference.measure), so a manifest for other weights is refused up front.
2. Every file the manifest lists is fetched from ``$VAR/<path>`` unless DIR already holds it with
   the listed size and sha256 (a restart re-uses the volume); each download is hashed as it
   streams into ``<path>.partial`` and renamed into place only when size and sha256 match.
3. DIR must then hold exactly the listed files: anything else (which the server would measure
   into a different root and refuse) is an error here, so the failure names the file.

The server measures DIR again at start (``--expect-weights-root``); this step makes the common
failure (a wrong or partial download) fail early, with a clear reason, before vLLM loads.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MANIFEST_HEADER = "tee-inference-model-manifest/v1"
PARTIAL = ".partial"
CHUNK = 1 << 20


class FetchError(Exception):
    pass


@dataclass(frozen=True)
class Entry:
    sha256: str
    size: int
    path: str


def parse_manifest(text: str) -> list[Entry]:
    lines = text.split("\n")
    if not lines or lines[0] != MANIFEST_HEADER:
        raise FetchError(f"not a {MANIFEST_HEADER} manifest")
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        if line.startswith("exclude "):
            raise FetchError(f"manifest line {number}: a manifest with exclusions cannot be provisioned")
        digest, size, path = line.split("  ", 2)
        parts = path.split("/")
        if path.startswith("/") or ".." in parts or "" in parts or len(digest) != 64:
            raise FetchError(f"manifest line {number}: unusable entry {path!r}")
        entries.append(Entry(digest, int(size), path))
    return entries


def file_matches(path: Path, entry: Entry) -> bool:
    if not path.is_file() or path.is_symlink() or path.stat().st_size != entry.size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == entry.sha256


def download(url: str, target: Path, entry: Entry) -> None:
    partial = target.with_name(target.name + PARTIAL)
    digest, size = hashlib.sha256(), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:  # noqa: S310
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if size > entry.size:
                    raise FetchError(f"{entry.path}: more than the {entry.size} bytes the manifest lists")
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{entry.path}: download failed: {exc}") from None
    except FetchError:
        partial.unlink(missing_ok=True)
        raise
    if size != entry.size or digest.hexdigest() != entry.sha256:
        partial.unlink(missing_ok=True)
        raise FetchError(
            f"{entry.path}: got {size} bytes with sha256 {digest.hexdigest()}, "
            f"the manifest lists {entry.size} bytes with sha256 {entry.sha256}"
        )
    os.replace(partial, target)


def provision(
    manifest: bytes, dest: Path, base_url: str | None, expected_root: str | None
) -> tuple[int, int]:
    """Make ``dest`` hold exactly the manifest's files; (fetched, kept) counts."""
    root = hashlib.sha256(manifest).hexdigest()
    if expected_root is not None and root != expected_root.lower():
        raise FetchError(f"the manifest measures to {root}, not the expected weights root {expected_root}")
    entries = parse_manifest(manifest.decode("utf-8"))
    fetched = kept = 0
    for entry in entries:
        target = dest / entry.path
        if file_matches(target, entry):
            kept += 1
            continue
        if base_url is None:
            raise FetchError(f"{entry.path} is missing from {dest} and no URL was given to fetch it from")
        url = base_url.rstrip("/") + "/" + urllib.parse.quote(entry.path)
        download(url, target, entry)
        fetched += 1
    listed = {e.path for e in entries}
    extra = sorted(
        str(p.relative_to(dest)) for p in dest.rglob("*")
        if not p.is_dir() and str(p.relative_to(dest)) not in listed
    )  # fmt: skip
    if extra:
        raise FetchError(f"{dest} holds files the manifest does not list: {', '.join(extra[:5])}")
    return fetched, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fetch-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--url-env", required=True, metavar="VAR", help="variable that holds the base URL")
    parser.add_argument("--expect-weights-root", metavar="HEX")
    args = parser.parse_args(argv)
    # Without a URL the weights must already be there (a volume provisioned earlier).
    base_url = os.environ.get(args.url_env) or None
    try:
        manifest = args.manifest.read_bytes()
        fetched, kept = provision(manifest, args.dest, base_url, args.expect_weights_root)
    except (FetchError, OSError, ValueError) as exc:
        print(f"fetch-model: {exc}", file=sys.stderr)
        return 1
    root = hashlib.sha256(manifest).hexdigest()
    print(f"fetch-model: {args.dest} holds weights root {root} ({fetched} fetched, {kept} already there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
