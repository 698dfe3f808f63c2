"""What each request leaves behind: metrics and one structured log line, never its content.

The access line is JSON on the `tee_inference.access` logger, one per request, in every
deployment (inside vLLM too: see `ensure_log_handler`):

    {"request": "access", "id": "chatcmpl-…", "route": "/v1/chat/completions", "method": "POST",
     "status": 200, "latency_ms": 812.4, "ttfb_ms": 35.1, "completion_tokens": 16,
     "stream_events": null, "signed": true}

Only the route's name (never the raw path, which a client chooses), the completion id the
server chose, numbers and booleans: no body, no header value, no query string.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from tee_inference.asgi import Message, Send
from tee_inference.logformat import log_handler
from tee_inference.metrics import ServingMetrics

access_log = logging.getLogger("tee_inference.access")
# What json.dumps(line, separators=(",", ":")) does, without building an encoder per request.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


class Observed:
    """Counts a request's status and timings; the exchange adds what it learned (id, tokens)."""

    __slots__ = (
        "_send",
        "completion_id",
        "completion_tokens",
        "downstream",
        "first_byte",
        "method",
        "metrics",
        "route",
        "signed",
        "started",
        "status",
        "stream_events",
    )

    def __init__(self, metrics: ServingMetrics, route: str, method: str, send: Send) -> None:
        self.metrics = metrics
        self.route = route
        self.method = method
        self._send = send
        # Where `send` forwards to. Once the response started and its first byte went out, `send`
        # only forwards: a stream's later events may go here directly.
        self.downstream = send
        self.started = time.perf_counter()
        self.first_byte: float | None = None
        self.status = 0
        self.completion_id: str | None = None
        self.completion_tokens: int | None = None
        self.stream_events: int | None = None
        self.signed: bool | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        elif self.first_byte is None and message.get("body"):
            self.first_byte = time.perf_counter()
            self.metrics.child(self.metrics.first_byte, self.route).observe(self.first_byte - self.started)
        await self._send(message)

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.started
        status = self.status or 499
        metrics = self.metrics
        metrics.child(metrics.requests, self.route, str(status)).inc()
        metrics.child(metrics.latency, self.route).observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):
            line = {
                "request": "access",
                "id": self.completion_id,
                "route": self.route,
                "method": self.method if self.method.isalpha() and len(self.method) <= 16 else "other",
                "status": status,
                "latency_ms": round(elapsed * 1e3, 1),
                "ttfb_ms": None
                if self.first_byte is None
                else round((self.first_byte - self.started) * 1e3, 1),
                "completion_tokens": self.completion_tokens,
                "stream_events": self.stream_events,
                "signed": self.signed,
            }
            access_log.info(_compact_json(line))


def ensure_log_handler() -> None:
    """Give our loggers a handler where the host process configured only its own (vLLM does).

    vLLM sets up the `vllm` logger alone, so records of `tee_inference.*` would reach no handler
    (Python's last-resort handler prints only warnings). Called when vLLM constructs the
    middleware; a process that configured logging itself (`tee-inference serve`) is left as is.
    """
    ours = logging.getLogger("tee_inference")
    if ours.handlers or logging.getLogger().handlers:
        return
    ours.addHandler(log_handler(sys.stderr))
    ours.setLevel(logging.INFO)
