"""ASGI type aliases, kept local so the request path does not depend on a framework's types."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (names are lowercase in ASGI)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def one_shot_receive(body: bytes) -> Receive:
    """A `receive` for an in-process request: the whole body once, then no disconnect ever.

    The caller never goes away, so after the body it waits until the app is done and
    cancels whatever listens for a disconnect.
    """
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()
        return {"type": "http.disconnect"}

    return receive
