"""ConfigfsTsm (the real client) against a fake that enforces the kernel's configfs-tsm semantics."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from fakes.configfs_tsm import FakeConfigfsTsm
from tee_inference.attestation.tdx_quote import parse_quote
from tee_inference.tee.configfs_tsm import (
    ConfigfsTsm,
    ConfigfsTsmError,
    OsTsmFs,
    TsmProviderError,
    TsmRaceError,
    TsmTimeoutError,
    TsmUnavailableError,
)

REPORT_DATA = bytes(range(64))


class FakeClock:
    """Time that moves only when the client sleeps, so back-off and deadlines run instantly."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake(tmp_path: Path) -> FakeConfigfsTsm:
    return FakeConfigfsTsm(tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def client(fake: FakeConfigfsTsm, clock: FakeClock, **kwargs: float) -> ConfigfsTsm:
    return ConfigfsTsm(fake.root, fs=fake, clock=clock.clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


def test_happy_path_quote_carries_report_data(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    quote = client(fake, clock).get_quote(REPORT_DATA)
    assert parse_quote(quote).report_data == REPORT_DATA
    # One write() call of exactly the 64 bytes, into inblob of the entry we made.
    assert len(fake.write_calls) == 1
    path, data = fake.write_calls[0]
    assert path.name == "inblob" and data == REPORT_DATA
    assert path.parent == fake.entries_made[0]
    assert fake.entries() == []


def test_entries_are_unique_per_quote(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    tsm = client(fake, clock)
    tsm.get_quote(REPORT_DATA)
    tsm.get_quote(REPORT_DATA)
    assert len(set(fake.entries_made)) == 2
    assert fake.entries() == []


def test_generation_race_is_retried_and_returns_our_quote(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    raced = fake.other_writer()
    calls = 0

    def race_once(entry: Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raced(entry)

    fake.after_write = race_once
    quote = client(fake, clock).get_quote(REPORT_DATA)
    assert parse_quote(quote).report_data == REPORT_DATA
    assert len(fake.write_calls) == 2  # our first write was spoiled, the second was not
    assert fake.entries() == []


def test_persistent_race_fails_with_clear_error(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    fake.after_write = fake.other_writer()
    with pytest.raises(TsmRaceError, match="another process keeps writing"):
        ConfigfsTsm(fake.root, fs=fake, clock=clock.clock, sleep=clock.sleep, max_race_retries=2).get_quote(
            REPORT_DATA
        )
    assert len(fake.write_calls) == 3
    assert fake.entries() == []


def test_ebusy_backs_off_then_succeeds(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    fake.fail["outblob"] = [errno.EBUSY, errno.EBUSY]
    quote = client(fake, clock).get_quote(REPORT_DATA)
    assert parse_quote(quote).report_data == REPORT_DATA
    assert clock.sleeps == [0.05, 0.1]
    assert fake.entries() == []


def test_ebusy_forever_times_out(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    fake.fail["outblob"] = [errno.EBUSY] * 1000
    with pytest.raises(TsmTimeoutError, match=r"EBUSY \(Device or resource busy\) after 5 s"):
        client(fake, clock, timeout_s=5).get_quote(REPORT_DATA)
    assert 0 < clock.now <= 5
    assert fake.entries() == []


def test_kernel_timeout_is_reported(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    fake.fail["outblob"] = [errno.ETIMEDOUT]
    with pytest.raises(TsmTimeoutError, match="ETIMEDOUT"):
        client(fake, clock).get_quote(REPORT_DATA)
    assert fake.entries() == []


def test_deadline_passed_between_steps(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    # A race costs no sleep, so make the clock jump as if the outblob read took a long time.
    def slow_race(entry: Path) -> None:
        clock.now += 100
        fake.other_writer()(entry)

    fake.after_write = slow_race
    with pytest.raises(TsmTimeoutError, match="no quote within 10 s"):
        client(fake, clock, timeout_s=10).get_quote(REPORT_DATA)
    assert fake.entries() == []


def test_einval_is_a_clear_error(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    fake.fail["outblob"] = [errno.EINVAL]
    with pytest.raises(ConfigfsTsmError, match=r"outblob: EINVAL .*refused"):
        client(fake, clock).get_quote(REPORT_DATA)
    assert fake.entries() == []


def test_eio_is_a_clear_error(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    fake.fail["outblob"] = [errno.EIO]
    with pytest.raises(ConfigfsTsmError, match=r"EIO \(Input/output error\); the GetQuote hypercall failed"):
        client(fake, clock).get_quote(REPORT_DATA)
    assert fake.entries() == []


def test_wrong_length_refused_before_touching_configfs(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        client(fake, clock).get_quote(b"short")
    assert fake.entries_made == []


def test_missing_root(tmp_path: Path, clock: FakeClock) -> None:
    fake = FakeConfigfsTsm(tmp_path)
    fake.remove_root()
    with pytest.raises(TsmUnavailableError, match=r"configfs-tsm not available at .*report: ENOENT"):
        client(fake, clock).get_quote(REPORT_DATA)
    [result] = client(fake, clock).check()
    assert not result.ok and "configfs-tsm not available at" in result.detail


def test_missing_root_on_the_real_filesystem(tmp_path: Path) -> None:
    tsm = ConfigfsTsm(tmp_path / "no" / "tsm" / "report")
    with pytest.raises(TsmUnavailableError, match="configfs-tsm not available at"):
        tsm.get_quote(REPORT_DATA)
    assert not tsm.check()[0].ok


def test_no_provider_registered(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    fake.provider = None
    with pytest.raises(TsmUnavailableError, match=r"ENXIO.*no TSM provider"):
        client(fake, clock).get_quote(REPORT_DATA)


def test_provider_not_tdx_guest(tmp_path: Path, clock: FakeClock) -> None:
    fake = FakeConfigfsTsm(tmp_path, provider="sev_guest")
    with pytest.raises(TsmProviderError, match="provider is 'sev_guest', expected 'tdx_guest'"):
        client(fake, clock).get_quote(REPORT_DATA)
    assert fake.write_calls == []  # nothing written to a provider we do not trust
    assert fake.entries() == []
    results = client(fake, clock).check()
    assert [r.ok for r in results] == [True, False]
    assert "sev_guest" in results[1].detail
    assert fake.entries() == []


def test_check_ok(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    results = client(fake, clock).check()
    assert all(r.ok for r in results)
    assert results[1].detail == "provider 'tdx_guest'"
    assert fake.entries() == []


def test_entry_removed_even_when_rmdir_races(fake: FakeConfigfsTsm, clock: FakeClock) -> None:
    fake.fail["rmdir"] = [errno.EBUSY]
    # The quote is still returned; the leak is logged, not raised.
    assert parse_quote(client(fake, clock).get_quote(REPORT_DATA)).report_data == REPORT_DATA


def test_real_filesystem_seam_single_write(tmp_path: Path) -> None:
    fs = OsTsmFs()
    target = tmp_path / "inblob"
    target.write_bytes(b"")
    assert fs.write_once(target, REPORT_DATA) == 64
    assert fs.read(target) == REPORT_DATA
    fs.mkdir(tmp_path / "entry")
    assert fs.is_dir(tmp_path / "entry")
    fs.rmdir(tmp_path / "entry")
    assert not (tmp_path / "entry").exists()
