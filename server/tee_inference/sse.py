"""Reading an SSE response body as it streams past: its completion id and its final `[DONE]`.

Written by hand because no SSE library parses incrementally from arbitrary byte splits
without owning the transport: the engine's body messages may split an event anywhere
(even inside a UTF-8 sequence or the `\\n\\n` terminator) or carry several events at once.
"""

from __future__ import annotations

import json
import re
from typing import Final

from tee_inference.signing import CompletionSignature

# vLLM's last event, byte for byte. A stream is signed and stored when it arrives and before
# it is released, so a client that holds `[DONE]` can always fetch its signature.
DONE_EVENT: Final = b"data: [DONE]\n\n"

# An SSE event ends at a blank line; any of the three line endings is allowed by the spec.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _fields_of(document: bytes) -> tuple[str | None, int | None]:
    try:
        value = json.loads(document)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(value, dict):
        return None, None
    cid = value.get("id")
    usage = value.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return (
        cid if isinstance(cid, str) and cid else None,
        tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None,
    )


def _id_of(document: bytes) -> str | None:
    return _fields_of(document)[0]


def completion_id_from_json(body: bytes) -> str | None:
    """The `id` of a non-streaming completion body, or None if it has none."""
    return _id_of(body)


def completion_fields_from_json(body: bytes) -> tuple[str | None, int | None]:
    """The `id` and `usage.completion_tokens` of a non-streaming completion body (None if absent)."""
    return _fields_of(body)


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


class DoneSplitter:
    """Fed every chunk of an SSE body; separates the final `data: [DONE]\\n\\n` event from the rest.

    `feed` returns the bytes that may be released now, and the `[DONE]` event once it is complete
    (with whatever followed it in the same chunk). The event counts only at an event boundary
    (start of the body or after a blank line), so `[DONE]` inside a JSON string never matches.
    A chunk that ends with a partial `data: [DONE]` at a boundary keeps those bytes (at most 13)
    until the next chunk says what they are: the last bytes are never released unsigned. Token
    events differ from `data: [` at their 7th byte, so nothing else is ever held.
    """

    __slots__ = ("_pending", "_tail")

    def __init__(self) -> None:
        self._pending = b""
        self._tail = b"\n\n"  # the last two bytes released: the body starts at a boundary

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """(bytes to release now, the `[DONE]` event and anything after it, or None)."""
        data = self._pending + chunk if self._pending else chunk
        at = data.find(DONE_EVENT)
        while at != -1:
            if self._at_boundary(data, at):
                self._pending = b""
                return data[:at], data[at:]
            at = data.find(DONE_EVENT, at + 1)
        keep = self._partial_done_at_end(data)
        if not keep:
            # The common case, a chunk of whole events: released as it is, nothing copied.
            self._pending = b""
            ready = data
        else:
            ready = data[: len(data) - keep]
            self._pending = data[len(data) - keep :]
        if len(ready) >= 2:
            self._tail = ready[-2:]
        elif ready:
            self._tail = (self._tail + ready)[-2:]
        return ready, None

    def passes(self, chunk: bytes) -> bool:
        """Whether `chunk` is one single-line event other than `[DONE]`, released as `feed` would.

        True when nothing is held and the chunk's only line break is its closing blank line: then
        its one event boundary is its start (the previous chunk ended an event), and an event
        that starts there and is not exactly `data: [DONE]\\n\\n` is not the last. That is every
        token event of vLLM, checked with one `memchr` and no copy; on False, call `feed`.
        """
        if self._pending or chunk.find(b"\n") != len(chunk) - 2 or chunk[-1:] != b"\n" or chunk == DONE_EVENT:
            return False
        self._tail = b"\n\n"
        return True

    def flush(self) -> bytes:
        """What is still held when the body ends without `[DONE]`."""
        pending, self._pending = self._pending, b""
        return pending

    def _at_boundary(self, data: bytes, at: int) -> bool:
        if at >= 2:
            return data.endswith(b"\n\n", 0, at)
        return (self._tail + data[:at]).endswith(b"\n\n")

    def _partial_done_at_end(self, data: bytes) -> int:
        # A chunk that ends an event (vLLM sends one event per chunk) cannot end with a proper
        # prefix of `data: [DONE]\n\n`: none of those ends with a blank line.
        if data.endswith(b"\n\n") or b"d" not in data[-(len(DONE_EVENT) - 1) :]:
            return 0
        for size in range(min(len(DONE_EVENT) - 1, len(data)), 0, -1):
            start = len(data) - size
            if DONE_EVENT.startswith(data[start:]) and self._at_boundary(data, start):
                return size
        return 0


def inband_comment(completion_id: str | None, signature: CompletionSignature) -> bytes:
    """The in-band signature: one SSE comment line (`: signature {json}`) and a blank line.

    SSE clients (the OpenAI SDK's decoder included) ignore comment lines; a verifier removes this
    line to get the engine's bytes, which are what the signature covers.
    """
    document = {
        "id": completion_id,
        "text": signature.text,
        "signing_algo": "ecdsa",
        "signature": signature.ecdsa.hex(),
        "signing_address": signature.signing_address,
        "signature_ed25519": signature.ed25519.hex(),
        "signing_public_key_ed25519": signature.ed25519_public_key.hex(),
    }
    return b": signature " + json.dumps(document, separators=(",", ":")).encode("ascii") + b"\n\n"
