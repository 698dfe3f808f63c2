"""A faithful stand-in for the kernel's configfs-tsm report interface, for ConfigfsTsm's tests.

A plain directory cannot intercept system calls, so the fake is the ``TsmFs`` seam of the client:
the client's code (sequence, single write, generation check, retries, clean-up, error mapping) runs
unchanged, and this class does what the kernel does behind those calls, on a real temporary tree:

- ``mkdir`` of an entry under the root populates ``provider``, ``generation`` (0), ``inblob`` and
  ``outblob`` (configfs-tsm's ``tsm_report_make_item``); no provider registered → ENXIO;
- each write to ``inblob`` increments ``generation``; more than 64 bytes → EFBIG (configfs'
  per-attribute maximum);
- reading ``outblob`` generates the quote for the current inblob, once per generation; an inblob
  that is not exactly 64 bytes → EINVAL (tdx-guest's ``tdx_report_new``);
- ``inblob`` is write-only and the other attributes read-only (EACCES otherwise).

Faults are injected per step: ``fail["outblob"] = [errno.EBUSY]`` fails the next read of outblob
once; ``after_write`` runs right after each of our writes, to play a racing writer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from tee_inference.attestation.tdx_simulated import SimulatedQuoteSigner

_ATTRIBUTES = ("provider", "generation", "inblob", "outblob")
_WRITABLE = ("inblob",)
FAKE_MRTD = hashlib.sha384(b"fake configfs-tsm MRTD").digest()


def _oserror(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


class FakeConfigfsTsm:
    def __init__(
        self, base: Path, *, provider: str = "tdx_guest", signer: SimulatedQuoteSigner | None = None
    ):
        self.root = base / "config" / "tsm" / "report"
        self.root.mkdir(parents=True)
        self.provider: str | None = provider  # None: no TSM provider registered
        self.signer = signer or SimulatedQuoteSigner(bytes(32))
        self.fail: dict[str, list[int]] = {}
        self.after_write: Callable[[Path], None] | None = None
        self.write_calls: list[tuple[Path, bytes]] = []
        self.entries_made: list[Path] = []
        self.quotes_made = 0

    # -- helpers for tests ------------------------------------------------------------------

    def entries(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir()) if self.root.exists() else []

    def remove_root(self) -> None:
        shutil.rmtree(self.root.parent.parent)

    def other_writer(self, data: bytes = b"\xee" * 64) -> Callable[[Path], None]:
        """A hook that plays another process writing its own inblob into our entry."""

        def write(entry: Path) -> None:
            self._write_attribute(entry / "inblob", data)

        return write

    def _inject(self, step: str, path: Path) -> None:
        queue = self.fail.get(step)
        if queue:
            raise _oserror(queue.pop(0), path)

    def _entry_of(self, path: Path) -> Path:
        if path.parent.parent != self.root or not path.parent.is_dir():
            raise _oserror(errno.ENOENT, path)
        if path.name not in _ATTRIBUTES:
            raise _oserror(errno.ENOENT, path)
        return path.parent

    # -- the TsmFs seam ---------------------------------------------------------------------

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def mkdir(self, path: Path) -> None:
        self._inject("mkdir", path)
        if not self.root.is_dir() or path.parent != self.root:
            raise _oserror(errno.ENOENT, path)
        if self.provider is None:
            raise _oserror(errno.ENXIO, path)
        path.mkdir()  # FileExistsError (EEXIST) like the kernel
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        (path / "inblob").write_bytes(b"")
        (path / "outblob").write_bytes(b"")
        (path / ".outblob_generation").write_text("-1")
        self.entries_made.append(path)

    def rmdir(self, path: Path) -> None:
        self._inject("rmdir", path)
        if not path.is_dir():
            raise _oserror(errno.ENOENT, path)
        shutil.rmtree(path)  # configfs drops an item's attributes with it

    def read(self, path: Path) -> bytes:
        entry = self._entry_of(path)
        self._inject(path.name, path)
        if path.name in _WRITABLE:
            raise _oserror(errno.EACCES, path)
        if path.name == "outblob":
            return self._outblob(entry)
        return path.read_bytes()

    def write_once(self, path: Path, data: bytes) -> int:
        self._entry_of(path)
        self._inject(path.name, path)
        self.write_calls.append((path, bytes(data)))
        written = self._write_attribute(path, data)
        if self.after_write is not None:
            self.after_write(path.parent)
        return written

    # -- kernel behaviour -------------------------------------------------------------------

    def _write_attribute(self, path: Path, data: bytes) -> int:
        if path.name not in _WRITABLE:
            raise _oserror(errno.EACCES, path)
        if len(data) > 64:
            raise _oserror(errno.EFBIG, path)
        path.write_bytes(data)
        generation = path.parent / "generation"
        generation.write_text(f"{int(generation.read_text()) + 1}\n")
        return len(data)

    def _outblob(self, entry: Path) -> bytes:
        generation = int((entry / "generation").read_text())
        marker = entry / ".outblob_generation"
        if int(marker.read_text()) == generation:
            return (entry / "outblob").read_bytes()
        inblob = (entry / "inblob").read_bytes()
        if len(inblob) != 64:
            raise _oserror(errno.EINVAL, entry / "outblob")
        quote = self.signer.quote(inblob, mrtd=FAKE_MRTD, rtmrs=[bytes(48)] * 4)
        (entry / "outblob").write_bytes(quote)
        marker.write_text(str(generation))
        self.quotes_made += 1
        return quote
