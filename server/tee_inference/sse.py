"""Finding the completion id in a response body as it streams past.

Written by hand because no SSE library parses incrementally from arbitrary byte splits
without owning the transport: the engine's body messages may split an event anywhere
(even inside a UTF-8 sequence or the `\\n\\n` terminator) or carry several events at once.
"""

from __future__ import annotations

import json
import re

# An SSE event ends at a blank line; any of the three line endings is allowed by the spec.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _id_of(document: bytes) -> str | None:
    try:
        value = json.loads(document)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(value, dict):
        cid = value.get("id")
        if isinstance(cid, str) and cid:
            return cid
    return None


def completion_id_from_json(body: bytes) -> str | None:
    """The `id` of a non-streaming completion body, or None if it has none."""
    return _id_of(body)


def _event_data(event: bytes) -> bytes:
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
    return b"\n".join(data)


class StreamIdScanner:
    """Fed every chunk of an SSE body; reports the id of the first event that has one.

    Holds at most `limit` bytes, and only until the id is found: after that `feed` is a
    constant-time no-op, so the scanner never buffers the stream itself.
    """

    __slots__ = ("_buffer", "_search_from", "completion_id", "gave_up", "limit")

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self.completion_id: str | None = None
        self.gave_up = False
        self._buffer = bytearray()
        self._search_from = 0

    @property
    def done(self) -> bool:
        return self.completion_id is not None or self.gave_up

    def feed(self, chunk: bytes) -> None:
        if self.done or not chunk:
            return
        self._buffer += chunk
        while not self.done:
            match = _EVENT_END.search(self._buffer, self._search_from)
            if match is None:
                # A terminator may straddle the next chunk: re-scan the last 3 bytes.
                self._search_from = max(0, len(self._buffer) - 3)
                if len(self._buffer) > self.limit:
                    self._give_up()
                return
            event = bytes(self._buffer[: match.start()])
            del self._buffer[: match.end()]
            self._search_from = 0
            self.completion_id = _id_of(_event_data(event))
        self._buffer = bytearray()

    def _give_up(self) -> None:
        self.gave_up = True
        self._buffer = bytearray()
