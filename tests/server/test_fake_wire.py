"""The fake engine speaks vLLM 0.32's wire format: same fields, same order, same framing.

Compared against bytes captured from a real vLLM (tests/data/vllm_wire/, see its README).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from support.paths import DATA
from tee_inference.engines.fake import _json, _Reply

WIRE = DATA / "vllm_wire"


def skeleton(value: Any) -> Any:
    """The shape of a JSON value: keys in order, values replaced by their type."""
    if isinstance(value, dict):
        return [(k, skeleton(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [skeleton(v) for v in value]
    return type(value).__name__


def events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n")
    parts = body[:-2].split(b"\n\n")
    assert all(p.startswith(b"data: ") for p in parts)
    return [p[6:] for p in parts]


def fake_like(captured: list[dict[str, Any]], chat: bool, include_usage: bool) -> list[bytes]:
    pieces = [c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"]
              for c in captured if c["choices"]]  # fmt: skip
    finish = next(
        c["choices"][0]["finish_reason"]
        for c in captured
        if c["choices"] and c["choices"][0]["finish_reason"]
    )
    tokens = [p for p in pieces[1 if chat else 0 :] if p] if finish == "stop" else pieces[1 if chat else 0 :]
    reply = _Reply(completion_id=captured[0]["id"], created=captured[0]["created"], model=captured[0]["model"],
                   chat=chat, tokens=tokens, finish=finish, prompt_tokens=5)  # fmt: skip
    return list(reply.events(include_usage))


@pytest.mark.parametrize(
    ("name", "chat", "include_usage"),
    [
        ("chat_stream", True, False),
        ("chat_stream_usage", True, True),
        ("chat_unicode_stream", True, False),
        ("completion_stream", False, False),
        ("completion_stream_usage", False, True),
    ],
)
def test_stream_events_have_vllms_shape(name: str, chat: bool, include_usage: bool) -> None:
    body = (WIRE / f"{name}.body").read_bytes()
    captured_raw = events(body)
    assert captured_raw[-1] == b"[DONE]"
    captured = [json.loads(e) for e in captured_raw[:-1]]
    for raw, parsed in zip(captured_raw, captured, strict=False):
        assert _json(parsed) == raw  # our encoder writes vLLM's exact bytes
    ours = fake_like(captured, chat, include_usage)
    assert ours[-1] == b"data: [DONE]\n\n"
    ours_parsed = [json.loads(e[6:-2]) for e in ours[:-1]]
    assert [skeleton(e) for e in ours_parsed] == [skeleton(e) for e in captured]


@pytest.mark.parametrize(("name", "chat"), [("chat", True), ("chat_unicode", True), ("completion", False)])
def test_whole_body_has_vllms_shape(name: str, chat: bool) -> None:
    raw = (WIRE / f"{name}.body").read_bytes()
    captured = json.loads(raw)
    assert _json(captured) == raw
    choice = captured["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    reply = _Reply(completion_id=captured["id"], created=captured["created"], model=captured["model"], chat=chat,
                   tokens=[text], finish=choice["finish_reason"], prompt_tokens=1)  # fmt: skip
    assert skeleton(reply.whole()) == skeleton(captured)


def test_stream_content_type_matches() -> None:
    meta = json.loads((WIRE / "chat_stream.response.json").read_text())
    assert dict(meta["headers"])["content-type"] == "text/event-stream; charset=utf-8"
