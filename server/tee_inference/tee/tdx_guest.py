"""The TDX guest device: TDREPORT through ``/dev/tdx_guest``, RTMR reads and RTMR extension.

Kernel interfaces used, and where they are defined:

- ``TDX_CMD_GET_REPORT0 = _IOWR('T', 1, struct tdx_report_req)`` on ``/dev/tdx_guest``
  (include/uapi/linux/tdx-guest.h, upstream since Linux 6.2): 64 bytes of REPORTDATA in, the
  1024-byte TDREPORT out.
- RTMR extension and reads through sysfs, ``/sys/devices/virtual/misc/tdx_guest/measurements/
  rtmrN:sha384`` (Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest, Linux 6.16; the
  file is a binary attribute, drivers/virt/coco/tsm-mr.c): reading gives the 48 raw bytes of the
  register; a write must be exactly 48 bytes at offset 0 (else EINVAL) and extends it.
- Before 6.16 there was no upstream way to extend an RTMR. Intel's TDX guest kernels carried
  ``TDX_CMD_EXTEND_RTMR`` on the same device with ``struct tdx_extend_rtmr_req {__u8 data[48];
  __u8 index;}``, numbered ``_IOR('T', 3, …)`` = 0x80315403 by the drivers Intel's own
  libtdx_attest targets by default and ``_IOW('T', 3, …)`` = 0x40315403 by its "V3" driver
  (SGXDataCenterAttestationPrimitives, QuoteGeneration/quote_wrapper/tdx_attest/tdx_attest.c).
  Both are tried, _IOR first; kernels without either answer ENOTTY. docs/hardware-facts.md
  lists the sources.

The structs are declared to cffi exactly as the header declares them, so their sizes (and with
them the ioctl numbers) come from the C layout, not from hand-counted offsets. The call itself
goes through ``fcntl.ioctl`` with the cffi buffer: it releases the GIL and raises ``OSError``
with errno, which calling libc's ``ioctl`` through cffi would make us redo by hand.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import cffi

from tee_inference.exceptions import TrustRootError
from tee_inference.tee import StartCheck
from tee_inference.tee.configfs_tsm import describe_errno

DEVICE_PATH: Final = Path("/dev/tdx_guest")
MEASUREMENTS_DIR: Final = Path("/sys/devices/virtual/misc/tdx_guest/measurements")
REPORTDATA_LEN: Final = 64
TDREPORT_LEN: Final = 1024
RTMR_LEN: Final = 48

_CDEF: Final = """
typedef unsigned char __u8;
struct tdx_report_req {
    __u8 reportdata[64];
    __u8 tdreport[1024];
};
struct tdx_extend_rtmr_req {
    __u8 data[48];
    __u8 index;
};
"""

# The Linux _IOC encoding (include/uapi/asm-generic/ioctl.h; x86 uses the generic one):
# nr in bits 0-7, type in 8-15, size in 16-29, direction in 30-31 (1 = write, 2 = read).
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_SIZEMASK: Final = (1 << 14) - 1
_IOC_WRITE, _IOC_READ = 1, 2

# TDREPORT_STRUCT (Intel TDX Module ABI; the same offsets as Linux's drivers/virt/coco/tdx-guest/
# tdx-guest.c "TDREPORT fields" enum since 6.16): REPORTMACSTRUCT (256) with REPORTDATA at 128,
# TEE_TCB_INFO (256) at 256, TDINFO at 512: ATTRIBUTES (8), XFAM (8), MRTD at 528, MRCONFIGID,
# MROWNER, MROWNERCONFIG (48 each), RTMR0-3 at 720.
_TDREPORT_REPORTDATA: Final = 128
_TDREPORT_MRTD: Final = 528
_TDREPORT_RTMR0: Final = 720


def ioc(direction: int, type_char: str, nr: int, size: int) -> int:
    """The Linux ``_IOC(dir, type, nr, size)`` macro."""
    if not 0 <= size <= _IOC_SIZEMASK:
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (ord(type_char) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


class TdxGuestError(TrustRootError):
    """The TDX guest device failed; the message names the path and the errno."""


class TdxGuestUnavailableError(TdxGuestError):
    """No TDX guest device (not a TDX guest, or the tdx_guest driver is not loaded)."""


class RtmrExtendUnsupportedError(TdxGuestError):
    """The kernel offers neither the sysfs RTMR interface nor the legacy extend ioctl."""


@dataclass(frozen=True)
class TdReportFields:
    """The fields of a TDREPORT this project uses."""

    report_data: bytes
    mrtd: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]


def parse_tdreport(tdreport: bytes) -> TdReportFields:
    if len(tdreport) != TDREPORT_LEN:
        raise ValueError(f"a TDREPORT is {TDREPORT_LEN} bytes, got {len(tdreport)}")
    rtmrs = tuple(
        tdreport[_TDREPORT_RTMR0 + i * RTMR_LEN : _TDREPORT_RTMR0 + (i + 1) * RTMR_LEN] for i in range(4)
    )
    return TdReportFields(
        report_data=tdreport[_TDREPORT_REPORTDATA : _TDREPORT_REPORTDATA + REPORTDATA_LEN],
        mrtd=tdreport[_TDREPORT_MRTD : _TDREPORT_MRTD + RTMR_LEN],
        rtmrs=(rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]),
    )


class DeviceIo(Protocol):
    """The system calls the client makes: the seam a faithful fake replaces in tests."""

    def exists(self, path: Path) -> bool: ...

    def open(self, path: Path, flags: int) -> int: ...

    def close(self, fd: int) -> None: ...

    def ioctl(self, fd: int, request: int, buf: memoryview) -> None:
        """The kernel reads the argument from and writes the result into ``buf``."""
        ...

    def read_file(self, path: Path) -> bytes: ...

    def write_file_once(self, path: Path, data: bytes) -> int: ...


class OsDeviceIo:
    def exists(self, path: Path) -> bool:
        return path.exists()

    def open(self, path: Path, flags: int) -> int:
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, buf: memoryview) -> None:
        fcntl.ioctl(fd, request, buf, True)

    def read_file(self, path: Path) -> bytes:
        return path.read_bytes()

    def write_file_once(self, path: Path, data: bytes) -> int:
        # The kernel rejects partial digests, so the 48 bytes must reach it in one write().
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)


class _Abi:
    """The cffi declarations and the ioctl numbers derived from their sizes."""

    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEF)
        report_size = self.ffi.sizeof("struct tdx_report_req")
        extend_size = self.ffi.sizeof("struct tdx_extend_rtmr_req")
        self.get_report0 = ioc(_IOC_READ | _IOC_WRITE, "T", 1, report_size)
        # Intel's TDX guest kernels numbered the extend ioctl _IOR (most) or _IOW ("V3" driver).
        self.extend_rtmr_ior = ioc(_IOC_READ, "T", 3, extend_size)
        self.extend_rtmr = ioc(_IOC_WRITE, "T", 3, extend_size)
        self.extend_requests = (self.extend_rtmr_ior, self.extend_rtmr)


class TdxGuest:
    """``/dev/tdx_guest`` and the tdx_guest measurement files."""

    def __init__(
        self,
        device: Path = DEVICE_PATH,
        measurements: Path = MEASUREMENTS_DIR,
        *,
        io: DeviceIo | None = None,
    ) -> None:
        self.device = device
        self.measurements = measurements
        self._io: DeviceIo = io if io is not None else OsDeviceIo()
        self._abi = _Abi()

    @property
    def get_report0_request(self) -> int:
        return self._abi.get_report0

    @property
    def extend_rtmr_request(self) -> int:
        return self._abi.extend_rtmr

    @property
    def extend_rtmr_requests(self) -> tuple[int, ...]:
        """The legacy extend ioctl numbers, in the order they are tried."""
        return self._abi.extend_requests

    def get_tdreport(self, report_data: bytes) -> bytes:
        """TDREPORT0 (1024 bytes, MAC'd by the CPU) over these 64 bytes of REPORTDATA."""
        if len(report_data) != REPORTDATA_LEN:
            raise ValueError(f"report_data must be {REPORTDATA_LEN} bytes, got {len(report_data)}")
        ffi = self._abi.ffi
        req: Any = ffi.new("struct tdx_report_req *")
        ffi.memmove(req.reportdata, report_data, REPORTDATA_LEN)
        self._ioctl(self._abi.get_report0, memoryview(ffi.buffer(req)), "TDX_CMD_GET_REPORT0")
        return bytes(ffi.buffer(req.tdreport, TDREPORT_LEN))

    def rtmr_path(self, index: int) -> Path:
        return self.measurements / f"rtmr{index}:sha384"

    def read_rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        """RTMR0–3 now: from sysfs where the kernel has it, else from a fresh TDREPORT."""
        if all(self._io.exists(self.rtmr_path(i)) for i in range(4)):
            values = [self._read_register(self.rtmr_path(i)) for i in range(4)]
            return (values[0], values[1], values[2], values[3])
        return parse_tdreport(self.get_tdreport(bytes(REPORTDATA_LEN))).rtmrs

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        """Extend RTMR ``index`` with a SHA-384 digest: ``rtmr = sha384(rtmr ‖ digest)``.

        RTMR0 and RTMR1 belong to the firmware and the boot loader; only 2 and 3 are accepted.
        """
        if index not in (2, 3):
            raise ValueError(f"only RTMR2 and RTMR3 may be extended at run time, not RTMR{index}")
        if len(digest) != RTMR_LEN:
            raise ValueError(f"an RTMR extension is {RTMR_LEN} bytes (SHA-384), got {len(digest)}")
        path = self.rtmr_path(index)
        if self._io.exists(path):
            try:
                written = self._io.write_file_once(path, bytes(digest))
            except OSError as exc:
                raise TdxGuestError(f"RTMR{index} extend via {path}: {describe_errno(exc.errno)}") from None
            if written != RTMR_LEN:
                raise TdxGuestError(
                    f"RTMR{index} extend via {path}: short write, {written} of {RTMR_LEN} bytes"
                )
            return
        ffi = self._abi.ffi
        req: Any = ffi.new("struct tdx_extend_rtmr_req *")
        ffi.memmove(req.data, digest, RTMR_LEN)
        req.index = index
        for request in self._abi.extend_requests:
            try:
                self._ioctl(request, memoryview(ffi.buffer(req)), "TDX_CMD_EXTEND_RTMR")
                return
            except _NoSuchIoctl:
                continue
        raise RtmrExtendUnsupportedError(
            f"cannot extend RTMR{index}: {path} is absent and {self.device} has no TDX_CMD_EXTEND_RTMR "
            "(ENOTTY for both 0x80315403 and 0x40315403); needs Linux 6.16+ (CONFIG_TSM_MEASUREMENTS) "
            "or an Intel TDX guest kernel"
        )

    def extend_method(self) -> str:
        """Which interface ``extend_rtmr(3, …)`` will use, without extending anything."""
        return "sysfs" if self._io.exists(self.rtmr_path(3)) else "ioctl"

    def check(self) -> list[StartCheck]:
        """The device answers TDX_CMD_GET_REPORT0, and an RTMR3 extension interface is there."""
        results = []
        try:
            fields = parse_tdreport(self.get_tdreport(bytes(REPORTDATA_LEN)))
            results.append(
                StartCheck("tdx guest device", True, f"{self.device}, MRTD {fields.mrtd.hex()[:16]}…")
            )
        except TdxGuestError as exc:
            return [StartCheck("tdx guest device", False, str(exc))]
        if self.extend_method() == "sysfs":
            results.append(StartCheck("rtmr3 extend", True, str(self.rtmr_path(3))))
        else:
            # Probing the legacy ioctl would extend RTMR3, so it is taken on trust here and its
            # absence surfaces (as RtmrExtendUnsupportedError) at the first boot-time event.
            results.append(StartCheck("rtmr3 extend", True, f"legacy TDX_CMD_EXTEND_RTMR on {self.device}"))
        return results

    def _read_register(self, path: Path) -> bytes:
        try:
            value = self._io.read_file(path)
        except OSError as exc:
            raise TdxGuestError(f"reading {path}: {describe_errno(exc.errno)}") from None
        if len(value) != RTMR_LEN:
            raise TdxGuestError(f"reading {path}: expected {RTMR_LEN} bytes, got {len(value)}")
        return value

    def _ioctl(self, request: int, buf: memoryview, name: str) -> None:
        try:
            fd = self._io.open(self.device, os.O_RDWR)
        except OSError as exc:
            code = exc.errno
            if code in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                raise TdxGuestUnavailableError(
                    f"TDX guest device not available at {self.device}: {describe_errno(code)}; "
                    "not a TDX guest, or the tdx_guest driver is not loaded"
                ) from None
            if code in (errno.EACCES, errno.EPERM):
                raise TdxGuestError(
                    f"{self.device}: {describe_errno(code)}; the TDX guest device needs root"
                ) from None
            raise TdxGuestError(f"{self.device}: open failed: {describe_errno(code)}") from None
        try:
            self._io.ioctl(fd, request, buf)
        except OSError as exc:
            code = exc.errno
            if code == errno.ENOTTY and request in self._abi.extend_requests:
                raise _NoSuchIoctl from None
            detail = {
                errno.EIO: "; the TDCALL failed",
                errno.ENOTTY: "; this kernel does not implement it",
                errno.EFAULT: "; bad buffer",
            }.get(code or 0, "")
            raise TdxGuestError(f"{name} on {self.device}: {describe_errno(code)}{detail}") from None
        finally:
            self._io.close(fd)


class _NoSuchIoctl(Exception):
    """Internal: the device does not know the legacy extend ioctl."""
