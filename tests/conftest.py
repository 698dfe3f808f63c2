"""Shared fixtures: the real attestation vectors beside the project, skipped cleanly when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    """Root of ../shared/vectors; tests that need real data skip when it is not there."""
    if not VECTORS.is_dir():
        pytest.skip(f"real test vectors not found at {VECTORS}")
    return VECTORS
