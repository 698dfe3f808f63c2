"""TdxGuest (the real client: cffi layout, ioctl numbers, sysfs/ioctl choice, errors) on a fake device."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest

from fakes.tdx_guest import EXTEND_RTMR, EXTEND_RTMR_IOR, FAKE_MRTD, GET_REPORT0, FakeTdxGuestDevice
from tee_inference.tee.tdx_guest import (
    RtmrExtendUnsupportedError,
    TdxGuest,
    TdxGuestError,
    TdxGuestUnavailableError,
    ioc,
    parse_tdreport,
)

REPORT_DATA = bytes(range(64))


def guest(fake: FakeTdxGuestDevice) -> TdxGuest:
    return TdxGuest(fake.device, fake.measurements, io=fake)


def test_ioctl_numbers_follow_the_kernel_header(tmp_path: Path) -> None:
    g = guest(FakeTdxGuestDevice(tmp_path))
    assert g.get_report0_request == GET_REPORT0 == 0xC4405401
    assert g.extend_rtmr_request == EXTEND_RTMR
    assert g.extend_rtmr_requests == (EXTEND_RTMR_IOR, EXTEND_RTMR) == (0x80315403, 0x40315403)
    assert ioc(3, "T", 1, 1088) == 0xC4405401
    with pytest.raises(ValueError):
        ioc(3, "T", 1, 1 << 14)


def test_tdreport_round_trip(tmp_path: Path) -> None:
    fake = FakeTdxGuestDevice(tmp_path)
    report = guest(fake).get_tdreport(REPORT_DATA)
    fields = parse_tdreport(report)
    assert len(report) == 1024
    assert fields.report_data == REPORT_DATA
    assert fields.mrtd == FAKE_MRTD
    assert fake.open_fds == set()


def test_tdreport_rejects_wrong_length(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        guest(FakeTdxGuestDevice(tmp_path)).get_tdreport(b"x")


def test_extend_through_sysfs(tmp_path: Path) -> None:
    fake = FakeTdxGuestDevice(tmp_path)
    g = guest(fake)
    digest = hashlib.sha384(b"event").digest()
    g.extend_rtmr(3, digest)
    assert fake.extends == [("sysfs", 3, digest)]
    expected = hashlib.sha384(bytes(48) + digest).digest()
    assert g.read_rtmrs()[3] == expected
    assert g.extend_method() == "sysfs"


@pytest.mark.parametrize("kind", ["ior", "iow"])
def test_extend_through_legacy_ioctl(tmp_path: Path, kind: str) -> None:
    fake = FakeTdxGuestDevice(tmp_path, sysfs=False, legacy_extend=kind)
    g = guest(fake)
    digest = hashlib.sha384(b"event").digest()
    g.extend_rtmr(3, digest)
    assert fake.extends == [("ioctl", 3, digest)]
    # Without sysfs, the registers come from a TDREPORT.
    assert g.read_rtmrs()[3] == hashlib.sha384(bytes(48) + digest).digest()
    assert g.extend_method() == "ioctl"
    assert fake.open_fds == set()


def test_extend_unsupported_kernel(tmp_path: Path) -> None:
    fake = FakeTdxGuestDevice(tmp_path, sysfs=False, legacy_extend=None)
    with pytest.raises(RtmrExtendUnsupportedError, match=r"rtmr3:sha384 is absent .*ENOTTY.*6\.16"):
        guest(fake).extend_rtmr(3, bytes(48))
    assert fake.open_fds == set()


def test_extend_argument_checks(tmp_path: Path) -> None:
    g = guest(FakeTdxGuestDevice(tmp_path))
    with pytest.raises(ValueError, match="RTMR0"):
        g.extend_rtmr(0, bytes(48))
    with pytest.raises(ValueError, match="48 bytes"):
        g.extend_rtmr(3, bytes(32))


def test_sysfs_write_error_is_mapped(tmp_path: Path) -> None:
    fake = FakeTdxGuestDevice(tmp_path)

    def refuse(path: Path, data: bytes) -> int:
        raise OSError(errno.EPERM, "Operation not permitted")

    fake.write_file_once = refuse  # type: ignore[method-assign]
    with pytest.raises(TdxGuestError, match=r"RTMR3 extend via .*rtmr3:sha384: EPERM"):
        guest(fake).extend_rtmr(3, bytes(48))


def test_missing_device(tmp_path: Path) -> None:
    fake = FakeTdxGuestDevice(tmp_path, present=False)
    with pytest.raises(
        TdxGuestUnavailableError, match=r"TDX guest device not available at .*tdx_guest: ENOENT"
    ):
        guest(fake).get_tdreport(REPORT_DATA)
    [result] = guest(fake).check()
    assert not result.ok and "not available" in result.detail


def test_missing_device_on_the_real_filesystem(tmp_path: Path) -> None:
    g = TdxGuest(tmp_path / "tdx_guest", tmp_path / "measurements")
    with pytest.raises(TdxGuestUnavailableError, match="not available"):
        g.get_tdreport(REPORT_DATA)


def test_permission_denied(tmp_path: Path) -> None:
    fake = FakeTdxGuestDevice(tmp_path)
    fake.open_errno = errno.EACCES
    with pytest.raises(TdxGuestError, match=r"EACCES .*needs root"):
        guest(fake).get_tdreport(REPORT_DATA)


def test_ioctl_eio(tmp_path: Path) -> None:
    fake = FakeTdxGuestDevice(tmp_path)
    fake.ioctl_errno = errno.EIO
    with pytest.raises(TdxGuestError, match=r"TDX_CMD_GET_REPORT0 on .*: EIO .*TDCALL failed"):
        guest(fake).get_tdreport(REPORT_DATA)
    assert fake.open_fds == set()


def test_check(tmp_path: Path) -> None:
    results = guest(FakeTdxGuestDevice(tmp_path)).check()
    assert [(r.name, r.ok) for r in results] == [("tdx guest device", True), ("rtmr3 extend", True)]
    legacy = guest(FakeTdxGuestDevice(tmp_path, sysfs=False, legacy_extend="ior")).check()
    assert "legacy" in legacy[1].detail


def test_real_ioctl_path_reaches_the_kernel() -> None:
    # /dev/null does not know TDX ioctls: the real cffi buffer + fcntl.ioctl path runs and the
    # kernel's ENOTTY comes back as a clear error.
    g = TdxGuest(Path("/dev/null"), Path("/nonexistent/measurements"))
    with pytest.raises(TdxGuestError, match=r"TDX_CMD_GET_REPORT0 on /dev/null: ENOTTY"):
        g.get_tdreport(REPORT_DATA)
    with pytest.raises(RtmrExtendUnsupportedError, match="ENOTTY"):
        g.extend_rtmr(3, bytes(48))
