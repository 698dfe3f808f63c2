"""Shared fixtures: the real attestation vectors copied into tests/data (see its README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.paths import DATA


@pytest.fixture(scope="session")
def vectors() -> Path:
    """Root of the real attestation vectors (tests/data/vectors), part of this repository."""
    return DATA / "vectors"
