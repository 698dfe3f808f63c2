"""Our handler formats exactly as `logging.Formatter` would."""

from __future__ import annotations

import logging

import pytest

from tee_inference.logformat import LOG_FORMAT, SecondCachedFormatter


@pytest.mark.parametrize(
    "times",
    [
        [1700000000.0, 1700000000.5, 1700000000.999],  # one second, several records
        [1700000000.999, 1700000001.0, 1700000001.0004, 1699999999.2],  # across seconds, and back
    ],
)
def test_cached_date_gives_the_same_lines(times: list[float]) -> None:
    reference, cached = logging.Formatter(LOG_FORMAT), SecondCachedFormatter()
    for created in times:
        record = logging.LogRecord("tee_inference.access", logging.INFO, __file__, 1, "line %s", ("x",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert cached.format(record) == reference.format(record)
