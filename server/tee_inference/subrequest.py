"""Calling the wrapped application in-process, as our routes need its models and metrics.

This is how the middleware asks vLLM (or the proxy, or the fake engine) for `/v1/models`
without a network hop, so one code path serves every deployment.
"""

from __future__ import annotations

import logging

import anyio

from tee_inference.asgi import ASGIApp, Message, Scope, one_shot_receive

log = logging.getLogger("tee_inference.subrequest")


class ResponseTooLarge(Exception):
    pass


async def call_app(
    app: ASGIApp,
    scope: Scope,
    method: str,
    path: str,
    *,
    limit: int,
    timeout_s: float = 10.0,
    body: bytes = b"",
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A request to `app` (a JSON ``body`` when given); returns status, headers and at most `limit`
    body bytes.

    An app that has not finished in `timeout_s` is cancelled and answers 504: an engine that
    accepts and never answers must not hold a health probe or a completion's gate.
    """
    sub_scope = {
        **scope,
        "method": method,
        "path": path,
        "raw_path": path.encode("ascii"),
        "query_string": b"",
        "headers": [(b"accept", b"application/json"), (b"host", b"localhost")],
    }
    if body:
        sub_scope["headers"] += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    answer = bytearray()

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = int(message["status"])
            headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            answer.extend(message.get("body", b""))
            if len(answer) > limit:
                raise ResponseTooLarge(path)

    try:
        with anyio.fail_after(timeout_s):
            await app(sub_scope, one_shot_receive(body), send)
    except TimeoutError:
        log.warning("internal request %s %s took longer than %.1f s", method, path, timeout_s)
        return 504, [], b""
    except ResponseTooLarge:
        return 502, [], b""
    except Exception:
        log.exception("internal request %s %s failed", method, path)
        return 502, [], b""
    return status, headers, bytes(answer)
