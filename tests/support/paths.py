"""Where the tests find the repository and their data, wherever pytest is started from."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
DATA = TESTS / "data"
# The contract's own smoke checker lives beside the project in CI, not in this repository.
CONFORMANCE = REPO.parent / "shared" / "conformance" / "check.py"
