"""Prompts and completions never reach a log line, a metric label or an error message.

The marker goes in prompts and (through a scripted engine) in completions, down every path:
success, stream, malformed input, refused ids, engine errors, an engine that dies mid-stream
with the marker in its exception. The suite-wide watch in conftest.py checks every log record;
here the error bodies and /metrics are checked too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from support.privacy import MARKER, private_prompt
from support.servers import running
from tee_inference.asgi import Receive, Scope, Send
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.engines.proxy import create_proxy_app
from tee_inference.middleware import SigningMiddleware
from tee_inference.services import Services

MODEL = "fake-model"
JSON = {"content-type": "application/json"}


class MarkerEngine:
    """The fake engine, except that `stream: true` completions carry the marker and then crash."""

    def __init__(self, crash_message: str) -> None:
        self.fake = FakeEngine(MODEL)
        self.crash_message = crash_message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            await self.fake(scope, receive, send)
            return
        body = json.loads((await receive())["body"])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        event = {
            "id": "cmpl-0123456789abcdef",
            "object": "text_completion",
            "choices": [{"index": 0, "text": MARKER}],
        }
        await send(
            {
                "type": "http.response.body",
                "body": b"data: " + json.dumps(event).encode() + b"\n\n",
                "more_body": True,
            }
        )
        if body.get("crash"):
            raise RuntimeError(self.crash_message)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


@pytest.fixture(params=["direct", "proxied"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Services]]:
    services = boot(ServerConfig.build(served_models=(MODEL,), max_request_bytes=8192))
    if request.param == "direct":
        # In-process, the engine's exception passes through our layer: its text must not be logged.
        engine = MarkerEngine(f"engine crashed while generating {MARKER}")
        with running(SigningMiddleware(engine, services=services)) as url:
            yield url, services
    else:
        # Behind the proxy the engine is another server, whose own logs are not ours to keep clean.
        engine = MarkerEngine("engine crashed")
        with (
            running(engine) as engine_url,
            running(SigningMiddleware(create_proxy_app(engine_url), services=services)) as url,
        ):
            yield url, services


def test_the_marker_never_comes_back_except_as_content(
    served: tuple[str, Services], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url, services = served
    prompt = private_prompt("hello")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
    errors: list[httpx.Response] = []
    with httpx.Client(base_url=url, timeout=20) as client:
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert client.post("/v1/chat/completions", json={**chat, "stream": True}).status_code == 200
        streamed = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "stream": True})
        assert MARKER in streamed.text  # the completion carries it: the body is the client's own
        crashed = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "stream": True, "crash": True}
        )
        assert b"engine_error" in crashed.content
        errors += [
            client.post("/v1/chat/completions", content=json.dumps(chat)[:-3].encode(), headers=JSON),
            client.post(
                "/v1/chat/completions",
                content=json.dumps(chat).encode(),
                headers={"content-type": "text/plain"},
            ),
            client.post("/v1/chat/completions", json={**chat, "request_id": prompt}),
            client.post("/v1/chat/completions", json={**chat, "max_tokens": prompt}),
            client.post("/v1/chat/completions", json={**chat, "messages": prompt}),
            client.post("/v1/chat/completions", json={**chat, "messages": [{"content": prompt}]}),
            client.post("/v1/chat/completions", json={**chat, "padding": prompt * 400}),
            client.post("/v1/chat/completions", content=b"[" * 300 + prompt.encode(), headers=JSON),
            client.post("/v1/embeddings", json={"model": MODEL, "input": prompt}),
        ]
        metrics = client.get("/metrics").text
    for response in errors:
        assert 400 <= response.status_code < 600, response.text
        assert MARKER not in response.text, response.text
    assert MARKER not in metrics
    assert MARKER not in caplog.text
    assert services.metrics.signatures._value.get() >= 3
