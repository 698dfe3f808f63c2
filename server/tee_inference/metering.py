"""Counting a completion's usage as it passes, without changing a byte; signing and storing it after.

Usage is wanted for every completion, streams included, even when the client did not ask
(`stream_options.include_usage`). Asking on the client's behalf would change the request bytes
the client signed and the stream it receives, so the node never does; it takes the counts from
where they already are, in this order (docs/scale-out.md, "Usage"):

1. the ``usage`` the engine put in the answer: a whole body's, or a stream's usage event when the
   client asked for one. Exact.
2. the usage vLLM keeps per request for middleware (``request.state.request_metadata
   .final_usage_info``, in the ASGI scope's ``state``): set before ``data: [DONE]`` on every
   stream that completes, asked for or not. Exact, in-process vLLM only.
3. our own count, when a stream ended early (the client left, the engine failed) or the engine
   keeps no usage (vLLM behind the proxy): one completion token per forwarded event that carries
   generated output (vLLM sends one event per generated token, per choice, unless speculative
   decoding or `--stream-interval` batch several), and the prompt as the engine's own tokenizer
   counts it (`POST /tokenize`, the same template), or a bytes/4 estimate if it cannot.

Cases 1 and 2 are signed with source ``engine``, case 3 with source ``counted`` (usage.py).
The usage is signed and stored right after the last byte went out, off the path of ``[DONE]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping
from typing import Any, Final

import anyio

from tee_inference.asgi import ASGIApp, Scope, header
from tee_inference.services import Services
from tee_inference.store import is_storable_id
from tee_inference.subrequest import call_app
from tee_inference.usage import SignedUsage, Usage, UsageSource, sign_usage

log = logging.getLogger("tee_inference.metering")

USAGE_REF_HEADER: Final = b"x-tee-usage-ref"
_EVENT_END: Final = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# An event that carries generated output: a non-empty content, text or reasoning, or a tool call.
_GENERATED: Final = re.compile(rb'"(?:content|text|reasoning|reasoning_content)":"[^"]|"tool_calls":\[\{')
_USAGE_OBJECT: Final = b'"usage":{'
_MAX_PENDING: Final = 1 << 20  # an event larger than this is not counted (and not held)
_FINISH_TIMEOUT_S: Final = 10.0


def usage_numbers(value: object) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of an OpenAI ``usage`` object or vLLM's UsageInfo."""
    if isinstance(value, Mapping):
        prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    else:
        prompt, completion = getattr(value, "prompt_tokens", None), getattr(value, "completion_tokens", None)
    if type(prompt) is int and type(completion) is int and prompt >= 0 and completion >= 0:
        return prompt, completion
    return None


class UsageMeter:
    """One completion's usage: fed the plaintext the client gets, finished once at the end."""

    def __init__(self, services: Services, app: ASGIApp, scope: Scope) -> None:
        self.services = services
        self.app = app
        self.scope = scope
        self.request: Mapping[str, Any] | None = None  # the parsed request, once the gate read it
        self.reported: tuple[int, int] | None = None  # case 1
        self.generated = 0  # case 3
        self.answered = False  # a 200 answer started: there is usage to record
        self._pending = bytearray()

    def feed(self, data: bytes) -> None:
        """Stream bytes (plaintext), in order, however the engine split them."""
        self.answered = True
        self._pending += data
        start = 0
        for match in _EVENT_END.finditer(self._pending):
            self._event(bytes(self._pending[start : match.start()]))
            start = match.end()
        del self._pending[:start]
        if len(self._pending) > _MAX_PENDING:
            self._pending.clear()

    def _event(self, event: bytes) -> None:
        if _GENERATED.search(event) is not None:
            self.generated += 1
        if _USAGE_OBJECT in event:
            data = event.partition(b"data:")[2].strip()
            with contextlib.suppress(ValueError, AttributeError, RecursionError):
                self.reported = usage_numbers(json.loads(data).get("usage")) or self.reported

    def held(self, body: bytes) -> None:
        """A whole (non-streamed) answer's body, plaintext."""
        self.answered = True
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return
        if isinstance(value, dict):
            self.reported = usage_numbers(value.get("usage"))

    def engine_kept(self) -> tuple[int, int] | None:
        """Case 2: what vLLM recorded for middleware in the request's state, if it did."""
        state = self.scope.get("state")
        metadata = state.get("request_metadata") if isinstance(state, Mapping) else None
        return usage_numbers(getattr(metadata, "final_usage_info", None))

    async def finish(self, completion_id: str | None) -> SignedUsage | None:
        """Sign and store this completion's usage (once, after the exchange); None if there is none."""
        if not self.answered or completion_id is None or not is_storable_id(completion_id):
            return None
        with anyio.CancelScope(shield=True), anyio.move_on_after(_FINISH_TIMEOUT_S):
            usage = await self._usage(completion_id)
            signed = sign_usage(self.services.signer, usage)
            ref = (header(self.scope, USAGE_REF_HEADER) or b"").decode("latin-1")
            if not await self.services.usage.put(signed, ref if is_storable_id(ref) else None):
                log.warning("usage not stored: its completion id or ref is already held")
            self.services.metrics.usage_records.labels(usage.source).inc()
            return signed
        return None

    async def _usage(self, completion_id: str) -> Usage:
        numbers = self.reported or self.engine_kept()
        source: UsageSource = "engine"
        if numbers is None:
            source = "counted"
            numbers = (await self._prompt_tokens(), self.generated)
        return Usage(completion_id, numbers[0], numbers[1], source)

    async def _prompt_tokens(self) -> int:
        """The prompt as the engine's tokenizer counts it (vLLM's `/tokenize`), else an estimate."""
        request = self.request or {}
        query = _tokenize_query(request)
        if query is not None:
            status, _, body = await call_app(
                self.app, self.scope, "POST", "/tokenize", limit=16 << 20,
                timeout_s=self.services.config.engine_timeout_s, body=json.dumps(query).encode(),
            )  # fmt: skip
            try:
                count = json.loads(body)["count"] if status == 200 else None
            except (ValueError, KeyError, TypeError):
                count = None
            if type(count) is int and count >= 0:
                return count
        text = json.dumps(request.get("messages", request.get("prompt", "")), ensure_ascii=False)
        return max(1, len(text.encode("utf-8")) // 4)


def _tokenize_query(request: Mapping[str, Any]) -> dict[str, Any] | None:
    """vLLM's tokenize request for the same prompt, rendered with the same chat template options."""
    model = request.get("model")
    if isinstance(request.get("messages"), list):
        query = {"model": model, "messages": request["messages"], "add_generation_prompt": True,
                 "add_special_tokens": False}  # fmt: skip
        for name in ("tools", "chat_template", "chat_template_kwargs", "continue_final_message",
                     "add_generation_prompt", "add_special_tokens"):  # fmt: skip
            if name in request:
                query[name] = request[name]
        return query
    if isinstance(request.get("prompt"), str):
        return {"model": model, "prompt": request["prompt"],
                "add_special_tokens": request.get("add_special_tokens", True)}  # fmt: skip
    return None
