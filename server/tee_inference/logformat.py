"""Our log lines: one format, and a formatter that makes the date once a second.

Without dependencies, so the CLI of a verifier-only install (no web server) uses it too.
"""

from __future__ import annotations

import logging
import time
from typing import TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SecondCachedFormatter(logging.Formatter):
    """`logging.Formatter(fmt)` to the byte, with the date part of `asctime` made once a second.

    One access line per request goes through this formatter (`serve`, and inside vLLM); `strftime` was a
    fixed few µs of each. Records of the same second share the formatted date; the
    milliseconds are added per record exactly as `Formatter.formatTime` adds them.
    """

    def __init__(self, fmt: str = LOG_FORMAT) -> None:
        super().__init__(fmt)
        self._second: int | None = None
        self._date = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._date = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        if self.default_msec_format:
            return self.default_msec_format % (self._date, record.msecs)
        return self._date


def log_handler(stream: TextIO) -> logging.Handler:
    """Our log handler (the CLI's, and our loggers' inside vLLM): one LOG_FORMAT line per record."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SecondCachedFormatter())
    return handler
