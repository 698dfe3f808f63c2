"""Hardware-interface facts checked against public ground truth (docs/hardware-facts.md).

Real bytes where they exist: a CCEL event log, its ACPI table and the TDX quote taken on the same
Google Cloud TDX VM (go-tdx-guest's testdata; tests/data/vectors/README.md). Where no real bytes
are public (a TDREPORT read from /dev/tdx_guest), the constants are checked against the Linux
kernel's own definitions, written out here as the kernel writes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tee_inference.attestation.ccel import parse_ccel
from tee_inference.attestation.eventlog import replay
from tee_inference.attestation.tdx_quote import parse_quote
from tee_inference.tee import tdx_guest
from tee_inference.tee.tdx import CCEL_PATH

SHA384 = 48


@pytest.fixture(scope="module")
def gce(vectors: Path) -> Path:
    return vectors / "tdx" / "go-tdx-guest"


def test_real_ccel_replays_to_the_quote_of_the_same_vm(gce: Path) -> None:
    """43 firmware/boot events from a real TD's CCEL; RTMR0-3 of its quote are their replay."""
    events = parse_ccel((gce / "ccel_data.dat").read_bytes())
    quote = parse_quote((gce / "cos-113-tdx-quote.dat").read_bytes())
    assert len(events) == 43
    assert [sum(1 for e in events if e.imr == i) for i in range(4)] == [16, 7, 20, 0]
    assert tuple(replay(events)) == tuple(quote.td_report.rtmrs)
    # CCEL's "PCR" index 1-4 is RTMR0-3 (0 would be MRTD): the mapping the replay just confirmed.
    assert quote.td_report.report_data == (gce / "nonce.dat").read_bytes()


def test_real_ccel_acpi_table(gce: Path) -> None:
    """The ACPI CCEL table (56 bytes): signature, CC type 2 = TDX, LAML = the log area's length."""
    table = (gce / "ccel_table.dat").read_bytes()
    assert table[:4] == b"CCEL" and int.from_bytes(table[4:8], "little") == len(table) == 56
    assert table[36] == 2  # CC type: Intel TDX
    assert int.from_bytes(table[40:48], "little") == len((gce / "ccel_data.dat").read_bytes())
    assert str(CCEL_PATH) == "/sys/firmware/acpi/tables/data/CCEL"


def test_real_ccel_truncated_is_refused(gce: Path) -> None:
    data = (gce / "ccel_data.dat").read_bytes()
    used = next(i for i in range(len(data) - 8, 0, -1) if data[i] not in (0x00, 0xFF)) + 1
    with pytest.raises(ValueError, match="CCEL"):
        parse_ccel(data[: used - 10])


def test_tdreport_offsets_are_the_kernels() -> None:
    """Linux drivers/virt/coco/tdx-guest/tdx-guest.c (6.16), enum "TDREPORT fields"."""
    reportdata = 128
    tee_tcb_info = 256
    tdinfo = tee_tcb_info + 256
    attributes = tdinfo
    xfam = attributes + 8
    mrtd = xfam + 8
    mrconfigid = mrtd + SHA384
    mrowner = mrconfigid + SHA384
    mrownerconfig = mrowner + SHA384
    rtmr0 = mrownerconfig + SHA384
    assert (tdx_guest._TDREPORT_REPORTDATA, tdx_guest._TDREPORT_MRTD, tdx_guest._TDREPORT_RTMR0) == (
        reportdata, mrtd, rtmr0,
    ) == (128, 528, 720)  # fmt: skip
    assert tdx_guest.TDREPORT_LEN == 1024 and tdx_guest.REPORTDATA_LEN == 64


def test_uapi_numbers_and_paths() -> None:
    """include/uapi/linux/tdx-guest.h; Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest."""
    guest = tdx_guest.TdxGuest()
    # struct tdx_report_req { __u8 reportdata[64]; __u8 tdreport[1024]; }: _IOWR('T', 1, 1088).
    assert guest.get_report0_request == 0xC4405401
    # Intel's struct tdx_extend_rtmr_req { __u8 data[48]; __u8 index; } (49 bytes): _IOR then _IOW.
    assert guest.extend_rtmr_requests == (0x80315403, 0x40315403)
    assert str(guest.rtmr_path(3)) == "/sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384"
