"""Shared fixtures: the real attestation vectors, hypothesis profiles, and the privacy watch."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from support.paths import DATA
from support.privacy import MarkerWatch

# `make test` runs every property with a bounded number of examples; `make fuzz` (CI too) many more.
settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.register_profile("deep", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_WATCH = MarkerWatch()


def pytest_configure(config: pytest.Config) -> None:
    # Every record of ours (DEBUG up) and of every library (WARNING up, the root's level) passes
    # the watch, in every test of the suite.
    logging.getLogger().addHandler(_WATCH)
    logging.getLogger("tee_inference").setLevel(logging.DEBUG)


@pytest.fixture(autouse=True)
def no_private_marker_in_logs() -> Iterator[None]:
    """Fails any test during which a log record carried the privacy marker."""
    before = len(_WATCH.leaks)
    yield
    leaks = _WATCH.leaks[before:]
    if leaks:
        pytest.fail("private marker in log records:\n" + "\n".join(leaks), pytrace=False)


@pytest.fixture(scope="session")
def vectors() -> Path:
    """Root of the real attestation vectors (tests/data/vectors), part of this repository."""
    return DATA / "vectors"
