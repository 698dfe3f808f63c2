"""Finding the completion id however the stream is cut into chunks."""

from __future__ import annotations

import json

import pytest

from tee_inference.engines.fake import _Reply
from tee_inference.sse import StreamIdScanner, completion_id_from_json


def _stream(chat: bool = True) -> bytes:
    reply = _Reply(
        completion_id="chatcmpl-0123abcd" if chat else "cmpl-0123abcd",
        created=1,
        model="m",
        chat=chat,
        tokens=["Héllo", " 漢字", " world."],
        finish="stop",
        prompt_tokens=3,
    )
    return b"".join(reply.events(include_usage=True))


@pytest.mark.parametrize("chat", [True, False])
def test_split_at_every_byte_boundary(chat: bool) -> None:
    body = _stream(chat)
    want = "chatcmpl-0123abcd" if chat else "cmpl-0123abcd"
    for cut in range(len(body) + 1):
        scanner = StreamIdScanner()
        scanner.feed(body[:cut])
        scanner.feed(body[cut:])
        assert scanner.completion_id == want, cut


def test_byte_by_byte_and_two_cuts() -> None:
    body = _stream()
    scanner = StreamIdScanner()
    for i in range(len(body)):
        scanner.feed(body[i : i + 1])
    assert scanner.completion_id == "chatcmpl-0123abcd"
    first_event_end = body.index(b"\n\n") + 2
    for a in range(0, first_event_end + 2, 3):
        for b in range(a, first_event_end + 3):
            scanner = StreamIdScanner()
            for part in (body[:a], body[a:b], body[b:]):
                scanner.feed(part)
            assert scanner.completion_id == "chatcmpl-0123abcd", (a, b)


def test_coalesced_events_and_crlf_and_leading_comment() -> None:
    event = json.dumps({"id": "chatcmpl-x", "choices": []}).encode()
    for body in (
        b"data: " + event + b"\n\ndata: " + event + b"\n\ndata: [DONE]\n\n",
        b"data: " + event + b"\r\n\r\n",
        b": keep-alive\n\ndata: " + event + b"\n\n",
        b"data:" + event + b"\n\n",
        b"data: [DONE]\n\ndata: " + event + b"\n\n",
    ):
        scanner = StreamIdScanner()
        scanner.feed(body)
        assert scanner.completion_id == "chatcmpl-x", body


def test_no_id_and_size_limit() -> None:
    scanner = StreamIdScanner(limit=100)
    scanner.feed(b'data: {"error": {"message": "x"}}\n\n')
    assert scanner.completion_id is None and not scanner.gave_up
    scanner.feed(b"data: " + b"x" * 200)
    assert scanner.gave_up and scanner.done
    scanner.feed(b"\n\n")  # nothing more is held once it gave up
    assert scanner.completion_id is None


def test_stops_holding_bytes_after_the_id() -> None:
    scanner = StreamIdScanner()
    body = _stream()
    scanner.feed(body)
    assert scanner.done and len(scanner._buffer) == 0
    scanner.feed(b"x" * 10_000_000)
    assert len(scanner._buffer) == 0


def test_completion_id_from_json() -> None:
    assert completion_id_from_json(b'{"id":"cmpl-1","choices":[]}') == "cmpl-1"
    assert completion_id_from_json(b"[1]") is None
    assert completion_id_from_json(b"\xff") is None
