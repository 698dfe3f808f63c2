"""A faithful stand-in for ``/dev/tdx_guest`` and its sysfs registers: the ``DeviceIo`` seam.

It does what the kernel and the TDX module do behind the calls TdxGuest makes:
``TDX_CMD_GET_REPORT0`` (0xc4405401) fills a TDREPORT with REPORTDATA at 128, MRTD at 528 and
RTMR0–3 at 720; a 48-byte write to ``rtmrN:sha384`` (N = 2, 3) extends that register and reading
it gives the 48 raw bytes; the legacy ``TDX_CMD_EXTEND_RTMR`` extends when ``legacy_extend``
names the number this kernel knows (``"ior"``: 0x80315403, Intel's TDX guest kernels; ``"iow"``:
0x40315403, the "V3" driver) and answers ENOTTY otherwise, as upstream kernels do. The numbers are
written out here from the kernel header on purpose: the client computes them, the fake does not.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

GET_REPORT0 = 0xC4405401
EXTEND_RTMR = 0x40315403  # _IOW('T', 3, 49 bytes)
EXTEND_RTMR_IOR = 0x80315403  # _IOR('T', 3, 49 bytes)
_LEGACY = {"ior": EXTEND_RTMR_IOR, "iow": EXTEND_RTMR}
FAKE_MRTD = hashlib.sha384(b"fake tdx_guest MRTD").digest()


def _oserror(code: int, path: Path | None = None) -> OSError:
    return OSError(code, os.strerror(code), None if path is None else str(path))


class FakeTdxGuestDevice:
    def __init__(
        self,
        base: Path,
        *,
        present: bool = True,
        sysfs: bool = True,
        legacy_extend: str | None = None,
        rtmrs: tuple[bytes, ...] = (bytes(48),) * 4,
    ) -> None:
        self.device = base / "dev" / "tdx_guest"
        self.measurements = base / "sys" / "class" / "misc" / "tdx_guest" / "measurements"
        self.present = present
        self.sysfs = sysfs
        self.legacy_extend = legacy_extend
        self.rtmrs = [bytes(r) for r in rtmrs]
        self.ioctl_errno: int | None = None
        self.open_errno: int | None = None
        self.extends: list[tuple[str, int, bytes]] = []
        self.open_fds: set[int] = set()
        self._next_fd = 100

    def _register(self, path: Path) -> int | None:
        if self.present and self.sysfs and path.parent == self.measurements:
            for i in range(4):
                if path.name == f"rtmr{i}:sha384":
                    return i
        return None

    def exists(self, path: Path) -> bool:
        if path == self.device:
            return self.present
        return self._register(path) is not None

    def open(self, path: Path, flags: int) -> int:
        if self.open_errno is not None:
            raise _oserror(self.open_errno, path)
        if path != self.device or not self.present:
            raise _oserror(errno.ENOENT, path)
        self._next_fd += 1
        self.open_fds.add(self._next_fd)
        return self._next_fd

    def close(self, fd: int) -> None:
        self.open_fds.remove(fd)

    def ioctl(self, fd: int, request: int, buf: memoryview) -> None:
        if fd not in self.open_fds:
            raise _oserror(errno.EBADF)
        if self.ioctl_errno is not None:
            raise _oserror(self.ioctl_errno)
        if request == GET_REPORT0:
            if len(buf) != 1088:
                raise _oserror(errno.EFAULT)
            buf[64:] = self.tdreport(bytes(buf[:64]))
        elif self.legacy_extend is not None and request == _LEGACY[self.legacy_extend]:
            if len(buf) != 49:
                raise _oserror(errno.EFAULT)
            index = buf[48]
            if index not in (2, 3):
                raise _oserror(errno.EINVAL)
            self._extend("ioctl", index, bytes(buf[:48]))
        else:
            raise _oserror(errno.ENOTTY)

    def read_file(self, path: Path) -> bytes:
        index = self._register(path)
        if index is None:
            raise _oserror(errno.ENOENT, path)
        return self.rtmrs[index]

    def write_file_once(self, path: Path, data: bytes) -> int:
        index = self._register(path)
        if index is None:
            raise _oserror(errno.ENOENT, path)
        if index < 2:
            raise _oserror(errno.EACCES, path)  # RTMR0/1 files are read-only
        if len(data) != 48:
            raise _oserror(errno.EINVAL, path)
        self._extend("sysfs", index, data)
        return len(data)

    def _extend(self, how: str, index: int, digest: bytes) -> None:
        self.rtmrs[index] = hashlib.sha384(self.rtmrs[index] + digest).digest()
        self.extends.append((how, index, digest))

    def tdreport(self, report_data: bytes) -> bytes:
        mac_struct = bytes(128) + report_data + bytes(64)
        td_info = bytes(16) + FAKE_MRTD + bytes(48 * 3) + b"".join(self.rtmrs) + bytes(48 + 64)
        report = mac_struct + bytes(256) + td_info
        assert len(report) == 1024
        return report
