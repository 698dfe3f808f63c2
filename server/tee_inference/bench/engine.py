"""The benchmark's engine: the fake engine's exact bytes, at almost no cost of its own.

`FakeEngine` builds every answer from pydantic models and `json.dumps` per event (about 50 µs
for a small answer, 10 µs per streamed event), which would drown the cost of the layer in front
of it. `CannedEngine` renders each distinct request once through `FakeEngine` (so the wire bytes
stay vLLM's, byte for byte) and then replays that rendering with a fresh completion id, which
is all the signing layer needs to be exercised as it is in front of vLLM: a new id per answer
(ids are stored put-if-absent), the same framing, the same sizes.
"""

from __future__ import annotations

import os
from typing import Final

from tee_inference.asgi import Message, Receive, Scope, Send, one_shot_receive, read_body
from tee_inference.engines.fake import FakeEngine

# 32 characters, like vLLM's uuid4 hex request ids, so content-length never changes; no word of
# the fake engine's vocabulary contains it.
_PLACEHOLDER: Final = b"0123456789abcdef0123456789abcdef"
_MAX_SHAPES: Final = 64  # distinct request bodies rendered and kept


class CannedEngine:
    """An ASGI app: completions replayed from `FakeEngine`'s renderings, everything else forwarded."""

    def __init__(self, model: str) -> None:
        self.fake = FakeEngine(model)
        self._shapes: dict[tuple[str, bytes], tuple[list[tuple[Message, list[bytes]]], object]] = {}
        self._prefix = os.urandom(8).hex()
        self._count = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.fake(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client left
        key = (scope["path"], body)
        rendered = self._shapes.get(key)
        if rendered is None:
            rendered = await self._render(scope, body)
            if len(self._shapes) < _MAX_SHAPES:
                self._shapes[key] = rendered
        shape, metadata = rendered
        if metadata is not None:
            # What vLLM leaves in the request's state for middleware (its usage count), as the
            # fake engine does: the signing layer reads it instead of counting.
            scope.setdefault("state", {})["request_metadata"] = metadata
        self._count += 1
        fresh = f"{self._prefix}{self._count:016x}".encode("ascii")
        for message, parts in shape:
            if parts:
                await send(
                    {
                        "type": "http.response.body",
                        "body": fresh.join(parts),
                        "more_body": message["more_body"],
                    }
                )
            else:
                await send(message)

    async def _render(self, scope: Scope, body: bytes) -> tuple[list[tuple[Message, list[bytes]]], object]:
        rendered: list[tuple[Message, list[bytes]]] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.body":
                more = bool(message.get("more_body", False))
                parts = bytes(message.get("body", b"")).split(_PLACEHOLDER)
                rendered.append(({"type": message["type"], "more_body": more}, parts))
            else:
                rendered.append((message, []))

        headers = [*scope["headers"], (b"x-request-id", _PLACEHOLDER)]
        state: dict[str, object] = {}
        await self.fake.completion(
            {**scope, "headers": headers, "state": state},
            one_shot_receive(body),
            capture,
            chat=scope["path"] == "/v1/chat/completions",
        )
        return rendered, state.get("request_metadata")
