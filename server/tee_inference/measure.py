"""Model-weights measurement: one deterministic root over a model directory.

The root is what the server extends into RTMR3 and reports in ``info``, and what
``measurements/expected.json`` pins. It is defined so that an auditor can recompute
it with coreutils alone.

Manifest (UTF-8 text, ``\\n`` line ends, no trailing blank line)::

    tee-inference-model-manifest/v1
    exclude <pattern>                  one line per exclusion, sorted; usually none
    <sha256 hex>  <size>  <path>       one line per regular file, sorted bytewise by path

* ``path`` is the file's path relative to the directory, ``/``-separated; lines are
  sorted by the UTF-8 bytes of the path (``LC_ALL=C sort`` order). Fields are
  separated by two spaces; the path is the last field and may contain spaces.
* ``root = sha256(manifest bytes)``, lowercase hex.

Recompute without this code (GNU coreutils and findutils; no exclusions)::

    cd MODEL_DIR && { echo tee-inference-model-manifest/v1;
      find -L . -type f -printf '%P\\n' | LC_ALL=C sort | while IFS= read -r f; do
        printf '%s  %s  %s\\n' "$(sha256sum < "$f" | cut -c1-64)" "$(stat -L -c %s "$f")" "$f"
      done; } | sha256sum

(``-L`` follows symlinks, matching the symlink policy below.)

Deliberate choices:

* **Everything is included** by default, hidden files too (``.cache/``, ``.git/``,
  editor leftovers): the directory is exactly what vLLM is given, and a stray file can
  be a tokenizer or a config it reads. Exclusions must be named (``exclude=``); they
  are ``fnmatch`` patterns matched against a file's relative path and against each of
  its leading directories (``.git`` excludes ``.git/HEAD``), and they are written into
  the manifest, so excluding something changes the root.
* **Symlinks** to regular files *inside* the directory are measured as the target's
  content under the link's own path, not recorded as links: a reader following the
  path gets those bytes, and Hugging Face cache snapshots are exactly such links into
  ``blobs/``. Links that leave the directory, dangle, or point at directories are
  refused: the measured directory must be self-contained (a copy of it is what an
  auditor rehashes) and a directory link can repeat or loop the tree.
* **Empty directories** are ignored (nothing reads bytes from them). **Special files**
  (fifos, sockets, devices) and names that the line format cannot carry (newline,
  carriage return, not UTF-8) are refused.

Hashing streams each file in 1 MiB chunks on a thread pool (hashlib releases the GIL
on large updates), so memory stays at about one buffer per worker whatever the model
size, and every core is used when the model has several shards.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tee_inference.exceptions import MeasurementError

MANIFEST_HEADER = "tee-inference-model-manifest/v1"
CHUNK_SIZE = 1 << 20

Progress = Callable[[int, int], None]
"""Called with (bytes hashed so far, total bytes); calls are serialized but may come
from worker threads."""


class MeasurementMismatch(MeasurementError):
    """The directory differs from the expected manifest; ``path`` names the first difference."""

    exit_code = 1

    def __init__(self, message: str, path: str | None) -> None:
        super().__init__(f"MISMATCH: {message}")
        self.path = path


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str

    def line(self) -> str:
        return f"{self.sha256}  {self.size}  {self.path}\n"


@dataclass(frozen=True)
class ModelMeasurement:
    root: str
    files: tuple[FileEntry, ...]
    exclude: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def manifest_text(self) -> str:
        return manifest_text(self.files, self.exclude)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_HEADER,
            "root": self.root,
            "total_bytes": self.total_bytes,
            "exclude": list(self.exclude),
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }

    def verify_against(self, expected: ModelMeasurement | str) -> None:
        """Raise `MeasurementMismatch` naming the first differing file, if any.

        ``expected`` is a measurement or a manifest's text (as written by `manifest_text`).
        """
        other = parse_manifest(expected) if isinstance(expected, str) else expected
        if self.exclude != other.exclude:
            raise MeasurementMismatch(
                f"exclusions differ: measured {list(self.exclude)}, expected {list(other.exclude)}", None
            )
        _compare_entries(
            [(f.path, f.size, f.sha256) for f in self.files],
            [(f.path, f.size, f.sha256) for f in other.files],
        )
        if self.root != other.root:  # only reachable if a manifest's root was edited by hand
            raise MeasurementMismatch(f"root {self.root} != expected {other.root}", None)


def manifest_text(files: Iterable[FileEntry], exclude: Sequence[str] = ()) -> str:
    lines = [MANIFEST_HEADER + "\n"]
    lines += [f"exclude {p}\n" for p in sorted(exclude)]
    lines += [f.line() for f in files]
    return "".join(lines)


def root_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_manifest(text: str) -> ModelMeasurement:
    """Read a manifest written by `manifest_text`; its root is recomputed, never trusted."""
    lines = text.split("\n")
    if lines[-1] != "" or lines[0] != MANIFEST_HEADER:
        raise MeasurementError(f"not a {MANIFEST_HEADER} manifest (or missing final newline)")
    exclude: list[str] = []
    files: list[FileEntry] = []
    for number, line in enumerate(lines[1:-1], start=2):
        if line.startswith("exclude ") and not files:
            exclude.append(line[len("exclude ") :])
            continue
        parts = line.split("  ", 2)
        if len(parts) != 3 or len(parts[0]) != 64 or not parts[1].isdigit():
            raise MeasurementError(f"manifest line {number} is malformed: {line[:100]!r}")
        files.append(FileEntry(path=parts[2], size=int(parts[1]), sha256=parts[0]))
    paths = [f.path.encode() for f in files]
    if paths != sorted(paths) or len(set(paths)) != len(paths) or exclude != sorted(exclude):
        raise MeasurementError("manifest entries are not sorted and unique")
    return ModelMeasurement(root=root_of(text), files=tuple(files), exclude=tuple(exclude))


def _excluded(rel: str, patterns: Sequence[str]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def _check_name(rel: str) -> None:
    if "\n" in rel or "\r" in rel:
        raise MeasurementError(f"file name with a line break cannot be measured: {rel!r}")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise MeasurementError(f"file name is not UTF-8: {rel!r}") from None


def list_files(directory: Path, exclude: Sequence[str] = ()) -> list[tuple[str, Path, int]]:
    """(relative path, path to read, size) for every measured file, in manifest order."""
    top = directory.resolve()
    if not top.is_dir():
        raise MeasurementError(f"not a directory: {directory}")
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        base = Path(dirpath)
        # os.walk lists directory symlinks among dirnames without descending into them.
        for name in sorted(dirnames + filenames):
            path = base / name
            rel = path.relative_to(top).as_posix()
            _check_name(rel)
            if exclude and _excluded(rel, exclude):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode):
                continue
            if stat.S_ISLNK(st.st_mode):
                target = path.resolve()
                if not target.is_relative_to(top):
                    raise MeasurementError(f"symlink leaves the model directory: {rel} -> {target}")
                if not target.exists():
                    raise MeasurementError(f"dangling symlink: {rel}")
                st = target.stat()
                if stat.S_ISDIR(st.st_mode):
                    raise MeasurementError(f"symlink to a directory is refused: {rel}")
            if not stat.S_ISREG(st.st_mode):
                raise MeasurementError(f"special file (not a regular file) is refused: {rel}")
            found.append((rel, path, st.st_size))
    found.sort(key=lambda item: item[0].encode("utf-8"))
    return found


def _hash_file(path: Path, expected_size: int, rel: str, advance: Callable[[int], None]) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    read = 0
    with path.open("rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
            read += n
            advance(n)
    if read != expected_size:
        raise MeasurementError(f"{rel} changed size while being measured ({expected_size} -> {read})")
    return digest.hexdigest()


def measure_model(
    directory: Path,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
    exclude: Sequence[str] = (),
) -> ModelMeasurement:
    """Measure ``directory``; ``workers`` defaults to every core (1 means serial)."""
    listing = list_files(directory, exclude)
    total = sum(size for _, _, size in listing)
    done = 0
    lock = threading.Lock()

    def advance(n: int) -> None:
        nonlocal done
        if progress is None:
            return
        with lock:
            done += n
            progress(done, total)

    def one(item: tuple[str, Path, int]) -> FileEntry:
        rel, path, size = item
        return FileEntry(path=rel, size=size, sha256=_hash_file(path, size, rel, advance))

    count = max(1, min(workers or os.cpu_count() or 1, len(listing) or 1))
    if count == 1:
        entries = [one(item) for item in listing]
    else:
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="measure") as pool:
            entries = list(pool.map(one, listing))
    if progress is not None and total == 0:
        progress(0, 0)
    patterns = tuple(sorted(exclude))
    return ModelMeasurement(
        root=root_of(manifest_text(entries, patterns)), files=tuple(entries), exclude=patterns
    )


def _compare_entries(got: list[tuple[str, int, str]], want: list[tuple[str, int, str]]) -> None:
    got_by = {p: (s, h) for p, s, h in got}
    want_by = {p: (s, h) for p, s, h in want}
    for path in sorted(got_by.keys() | want_by.keys(), key=lambda p: p.encode("utf-8")):
        if path not in want_by:
            raise MeasurementMismatch(f"unexpected file: {path}", path)
        if path not in got_by:
            raise MeasurementMismatch(f"missing file: {path}", path)
        (gs, gh), (ws, wh) = got_by[path], want_by[path]
        if gs != ws:
            raise MeasurementMismatch(f"{path}: size {gs} != expected {ws}", path)
        if gh and gh != wh:
            raise MeasurementMismatch(f"{path}: sha256 {gh} != expected {wh}", path)


def check_model(
    directory: Path,
    expected: ModelMeasurement | str,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> ModelMeasurement:
    """Measure ``directory`` and raise `MeasurementMismatch` unless it matches ``expected``.

    Names and sizes are compared before anything is hashed, so a missing, extra or
    truncated shard is reported at once instead of after reading every byte.
    """
    want = parse_manifest(expected) if isinstance(expected, str) else expected
    listing = list_files(directory, want.exclude)
    _compare_entries(
        [(rel, size, "") for rel, _, size in listing], [(f.path, f.size, f.sha256) for f in want.files]
    )
    measured = measure_model(directory, workers=workers, progress=progress, exclude=want.exclude)
    measured.verify_against(want)
    return measured


def to_json_text(measurement: ModelMeasurement) -> str:
    return json.dumps(measurement.to_json(), indent=2, sort_keys=True) + "\n"
