"""TDX quotes through the kernel's configfs-tsm report interface (Linux 6.7+).

The ABI (Documentation/ABI/testing/configfs-tsm-report in the kernel tree): ``mkdir`` an entry
under ``/sys/kernel/config/tsm/report``; it holds ``provider`` (``tdx_guest`` on TDX),
``generation``, the write-only ``inblob`` (up to 64 bytes) and the read-only ``outblob``
(the quote). ``generation`` increments on every write to the entry, so a reader can tell
whether the ``outblob`` it read belongs to its own ``inblob``.

errno values the TDX provider gives (drivers/virt/coco/tdx-guest/tdx-guest.c), and what we do:

- EBUSY: a previous GetQuote still owns the shared quote buffer → back off and retry;
- EINVAL: the inblob was not exactly 64 bytes → a clear error (no retry);
- EIO: the GetQuote hypercall failed (the host's quote service) → a clear error;
- ETIMEDOUT: the host did not answer within the kernel's 30 s → a time-out error;
- ENXIO on mkdir: configfs-tsm exists but no provider registered; ENOENT: no configfs-tsm.

There is no library for this: the interface is a handful of files, and the value is in the
exact sequence and error handling, which is kept here in one place.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol, TypeVar

from tee_inference.exceptions import TrustRootError
from tee_inference.tee import StartCheck

log = logging.getLogger(__name__)

DEFAULT_ROOT: Final = Path("/sys/kernel/config/tsm/report")
TDX_PROVIDER: Final = "tdx_guest"
INBLOB_SIZE: Final = 64
# Retrying EBUSY/EAGAIN/EINTR starts here and doubles, capped, until the deadline.
_BACKOFF_START_S: Final = 0.05
_BACKOFF_MAX_S: Final = 1.0
_RETRYABLE: Final = frozenset({errno.EBUSY, errno.EAGAIN, errno.EINTR})
_T = TypeVar("_T")


class ConfigfsTsmError(TrustRootError):
    """configfs-tsm could not produce a quote; the message names the path and the errno."""


class TsmUnavailableError(ConfigfsTsmError):
    """No configfs-tsm report interface (or no provider behind it) at the root."""


class TsmProviderError(ConfigfsTsmError):
    """The report provider is not ``tdx_guest``."""


class TsmRaceError(ConfigfsTsmError):
    """Another writer kept changing our entry between our write and our read."""


class TsmTimeoutError(ConfigfsTsmError):
    """The whole quote operation ran past its time limit."""


def describe_errno(code: int | None) -> str:
    """``EBUSY (Device or resource busy)``: the symbolic name a person can search for, and its meaning."""
    if code is None:
        return "unknown error"
    return f"{errno.errorcode.get(code, f'errno {code}')} ({os.strerror(code)})"


class TsmFs(Protocol):
    """The few filesystem calls the client makes: the seam a faithful fake replaces in tests."""

    def is_dir(self, path: Path) -> bool: ...

    def mkdir(self, path: Path) -> None: ...

    def rmdir(self, path: Path) -> None: ...

    def read(self, path: Path) -> bytes: ...

    def write_once(self, path: Path, data: bytes) -> int:
        """Open write-only, one ``write()`` of all of ``data``, close; the count ``write()`` returned."""
        ...


class OsTsmFs:
    """The real filesystem, through ``os`` so that each call is exactly one system call."""

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write_once(self, path: Path, data: bytes) -> int:
        # configfs binary attributes collect writes and hand them to the provider when the file is
        # closed, so one write() then close() is one inblob; a partial write must not be "completed".
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)


class ConfigfsTsm:
    """A configfs-tsm quote client: one uniquely named report entry per quote, always removed."""

    def __init__(
        self,
        root: Path = DEFAULT_ROOT,
        timeout_s: float = 60.0,
        *,
        max_race_retries: int = 3,
        fs: TsmFs | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.root = root
        self.timeout_s = timeout_s
        self.max_race_retries = max_race_retries
        self._fs: TsmFs = fs if fs is not None else OsTsmFs()
        self._clock = clock
        self._sleep = sleep

    def get_quote(self, report_data: bytes) -> bytes:
        """A quote from the provider whose report_data is exactly these 64 bytes.

        The deadline is checked between steps; one blocking read of ``outblob`` is bounded by the
        kernel's own GetQuote time-out (30 s), so the call can overrun ``timeout_s`` by that much.
        """
        if len(report_data) != INBLOB_SIZE:
            raise ValueError(f"report_data must be {INBLOB_SIZE} bytes, got {len(report_data)}")
        deadline = self._clock() + self.timeout_s
        entry = self._make_entry()
        try:
            return self._quote_in(entry, bytes(report_data), deadline)
        finally:
            self._remove_entry(entry)

    def _quote_in(self, entry: Path, report_data: bytes, deadline: float) -> bytes:
        races = 0
        backoff = _BACKOFF_START_S
        provider_checked = False
        while True:
            self._check_deadline(deadline, entry)
            try:
                if not provider_checked:
                    self._require_provider(entry)
                    provider_checked = True
                before = self._generation(entry)
                self._write_inblob(entry, report_data)
                quote = self._read(entry / "outblob")
                after = self._generation(entry)
            except _Retryable as busy:
                if self._clock() + backoff > deadline:
                    raise TsmTimeoutError(
                        f"configfs-tsm at {entry}: still {describe_errno(busy.errno)} after "
                        f"{self.timeout_s:g} s; the host's quote service is busy or stuck"
                    ) from None
                log.info(
                    "configfs-tsm %s: %s, retrying in %.2f s", busy.path, describe_errno(busy.errno), backoff
                )
                self._sleep(backoff)
                backoff = min(2 * backoff, _BACKOFF_MAX_S)
                continue
            if after == before + 1:
                if not quote:
                    raise ConfigfsTsmError(f"configfs-tsm at {entry}: outblob is empty")
                return quote
            races += 1
            if races > self.max_race_retries:
                raise TsmRaceError(
                    f"configfs-tsm at {entry}: generation went {before} → {after} around our single write "
                    f"{races} times; another process keeps writing to this report entry"
                )
            log.warning(
                "configfs-tsm %s: generation %d → %d, another writer raced; retrying", entry, before, after
            )

    def check(self) -> list[StartCheck]:
        """The interface is there, is configfs-tsm, and its provider is ``tdx_guest`` (probed by an entry)."""
        name = "configfs-tsm"
        if not self._fs.is_dir(self.root):
            return [StartCheck(name, False, f"configfs-tsm not available at {self.root}: no such directory")]
        try:
            entry = self._make_entry()
        except ConfigfsTsmError as exc:
            return [StartCheck(name, False, str(exc))]
        try:
            provider = self._read_provider(entry)
        except _Retryable as busy:
            detail = f"configfs-tsm at {busy.path}: {describe_errno(busy.errno)}"
            return [StartCheck(name, True, str(self.root)), StartCheck(f"{name} provider", False, detail)]
        except ConfigfsTsmError as exc:
            return [StartCheck(name, True, f"{self.root}"), StartCheck(f"{name} provider", False, str(exc))]
        finally:
            self._remove_entry(entry)
        ok = provider == TDX_PROVIDER
        detail = f"provider {provider!r}" + ("" if ok else f" at {self.root}; expected {TDX_PROVIDER!r}")
        return [StartCheck(name, True, str(self.root)), StartCheck(f"{name} provider", ok, detail)]

    # -- steps ---------------------------------------------------------------------------------

    def _make_entry(self) -> Path:
        for _ in range(3):
            entry = self.root / f"tee-inference-{os.getpid()}-{secrets.token_hex(6)}"
            try:
                self._fs.mkdir(entry)
                return entry
            except FileExistsError:
                continue  # a 48-bit random name collided: take another
            except OSError as exc:
                raise self._mkdir_error(exc) from None
        raise ConfigfsTsmError(f"configfs-tsm at {self.root}: could not create a uniquely named entry")

    def _mkdir_error(self, exc: OSError) -> ConfigfsTsmError:
        code = exc.errno
        if code in (errno.ENOENT, errno.ENOTDIR):
            return TsmUnavailableError(
                f"configfs-tsm not available at {self.root}: {describe_errno(code)}; "
                "needs Linux 6.7+ with CONFIG_TSM_REPORTS and configfs mounted at /sys/kernel/config"
            )
        if code in (errno.ENXIO, errno.ENODEV):
            return TsmUnavailableError(
                f"configfs-tsm not available at {self.root}: {describe_errno(code)}; "
                "no TSM provider is registered (is this a TDX guest with the tdx_guest driver loaded?)"
            )
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            return ConfigfsTsmError(f"configfs-tsm at {self.root}: {describe_errno(code)}; quotes need root")
        return ConfigfsTsmError(f"configfs-tsm at {self.root}: mkdir failed: {describe_errno(code)}")

    def _remove_entry(self, entry: Path) -> None:
        try:
            self._fs.rmdir(entry)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # Not raised: the quote (or the error being raised) matters more than a leaked entry.
            log.warning("configfs-tsm: could not remove %s: %s", entry, describe_errno(exc.errno))

    def _read_provider(self, entry: Path) -> str:
        return self._read(entry / "provider").decode("ascii", "replace").strip()

    def _require_provider(self, entry: Path) -> None:
        provider = self._read_provider(entry)
        if provider != TDX_PROVIDER:
            raise TsmProviderError(
                f"configfs-tsm at {self.root}: provider is {provider!r}, expected {TDX_PROVIDER!r}"
            )

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation").decode("ascii", "replace").strip()
        try:
            return int(text)
        except ValueError:
            raise ConfigfsTsmError(
                f"configfs-tsm at {entry / 'generation'}: not a number: {text[:20]!r}"
            ) from None

    def _write_inblob(self, entry: Path, report_data: bytes) -> None:
        path = entry / "inblob"
        written = self._call(path, lambda: self._fs.write_once(path, report_data))
        if written != len(report_data):
            raise ConfigfsTsmError(
                f"configfs-tsm at {path}: short write, {written} of {len(report_data)} bytes"
            )

    def _check_deadline(self, deadline: float, entry: Path) -> None:
        if self._clock() > deadline:
            raise TsmTimeoutError(f"configfs-tsm at {entry}: no quote within {self.timeout_s:g} s")

    def _read(self, path: Path) -> bytes:
        return self._call(path, lambda: self._fs.read(path))

    def _call(self, path: Path, step: Callable[[], _T]) -> _T:
        """Run one filesystem step on ``path``, turning its errno into our errors (or a retry signal)."""
        try:
            return step()
        except OSError as exc:
            code = exc.errno
            where = f"configfs-tsm at {path}"
            if code in _RETRYABLE:
                raise _Retryable(code, str(path)) from None
            if code == errno.EINVAL:
                raise ConfigfsTsmError(
                    f"{where}: {describe_errno(code)}; the provider refused the request "
                    f"(inblob must be exactly {INBLOB_SIZE} bytes)"
                ) from None
            if code == errno.EIO:
                raise ConfigfsTsmError(
                    f"{where}: {describe_errno(code)}; the GetQuote hypercall failed "
                    "(is the host's quote generation service running?)"
                ) from None
            if code == errno.ETIMEDOUT:
                raise TsmTimeoutError(
                    f"{where}: {describe_errno(code)}; the host did not deliver a quote"
                ) from None
            if code in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                raise TsmUnavailableError(
                    f"configfs-tsm not available at {path}: {describe_errno(code)}"
                ) from None
            raise ConfigfsTsmError(f"{where}: {describe_errno(code)}") from None


class _Retryable(Exception):
    """Internal: a step failed with an errno that means "try again shortly"."""

    def __init__(self, code: int, path: str) -> None:
        super().__init__(code, path)
        self.errno = code
        self.path = path
