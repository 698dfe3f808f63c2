"""Engines that answer with exactly the bytes a test scripts, and a vLLM-shaped stream to script."""

from __future__ import annotations

import json

from tee_inference.asgi import ASGIApp, Receive, Scope, Send
from tee_inference.engines.fake import FakeEngine, _Reply

MODEL = "fake-model"
REQUEST = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
).encode()


def _stream_body() -> bytes:
    reply = _Reply(completion_id="chatcmpl-feedbeef", created=7, model=MODEL, chat=True,
                   tokens=["Héllo", " 漢字", " world."], finish="stop", prompt_tokens=3)  # fmt: skip
    return b"".join(reply.events(include_usage=True))


def scripted_engine(chunks: list[bytes], *, content_type: bytes = b"text/event-stream; charset=utf-8",
                    fail_after: int | None = None) -> ASGIApp:  # fmt: skip
    """An engine that answers every completion with exactly these body messages."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await FakeEngine()(scope, receive, send)
            return
        if scope["path"] == "/v1/models":
            await FakeEngine(MODEL)(scope, receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]}
        )
        for i, chunk in enumerate(chunks):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("engine crashed")
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app
