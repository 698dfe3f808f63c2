"""The privacy marker: a string tests put in prompts and completions, which must never come back.

`tests/conftest.py` watches every log record of every test (our loggers at DEBUG, everything
else at WARNING) and fails the test whose records carry it; `test_privacy.py` also checks
error messages and metric labels. Tests that send prompts use `private_prompt()`.
"""

from __future__ import annotations

import logging
import traceback

MARKER = "PRIVATE-7f3a91-do-not-log"


def private_prompt(text: str = "") -> str:
    return f"{text} {MARKER} {text}".strip()


class MarkerWatch(logging.Handler):
    """Records every log record (message, arguments and traceback) that carries the marker."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("httpx", "httpcore")):
            return  # the tests' own HTTP clients, logging the URLs the tests chose
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not format: check them raw
            text = f"{record.msg!r} {record.args!r}"
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        if MARKER in text:
            self.leaks.append(f"{record.name} {record.levelname}: {text[:300]}")
