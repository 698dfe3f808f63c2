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
The usage is stored right after the last byte went out, off the path of ``[DONE]``, and signed
when first served (or at once, for a shared store: shared_store.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any, Final

from tee_inference.asgi import ASGIApp, Scope, header
from tee_inference.services import Services
from tee_inference.store import is_storable_id
from tee_inference.subrequest import call_app
from tee_inference.usage import Usage, UsageSource

log = logging.getLogger("tee_inference.metering")

USAGE_REF_HEADER: Final = b"x-tee-usage-ref"
# An event that carries generated output: a non-empty content, text or reasoning, or a tool call.
_GENERATED: Final = re.compile(rb'"(?:content|text|reasoning|reasoning_content)":"[^"]|"tool_calls":\[\{')
_USAGE_OBJECT: Final = b'"usage":{'
_CHAT_TOKEN: Final = b'"delta":{"content":"'
_MAX_PENDING: Final = 64 << 10  # a usage event is a few hundred bytes
_TAIL: Final = 32  # longer than any match of _GENERATED up to its first content byte


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
    """One completion's usage: fed the plaintext the client gets, finished once at the end.

    On the path of every chunk it does one regular-expression scan and one substring test, no
    parsing and no copy of the stream: JSON is parsed only at the end, and only when vLLM kept
    no count (case 2 needs none).
    """

    def __init__(self, services: Services, app: ASGIApp, scope: Scope) -> None:
        self.services = services
        self.app = app
        self.scope = scope
        self.request: Mapping[str, Any] | None = None  # the parsed request, once the gate read it
        self.generated = 0  # case 3
        self.answered = False  # a 200 answer started: there is usage to record
        self._usage_event: bytearray | None = None  # a stream's usage event, while it arrives
        self._partial = b""  # the bytes of the current event so far, to find where one starts
        self._whole: bytes | None = None  # a whole answer's body, parsed only if it is needed

    def feed(self, data: bytes) -> None:
        """Stream bytes (plaintext), in order, however the engine split them."""
        self.answered = True
        generated = len(_GENERATED.findall(data))
        partial = self._partial
        if partial:
            # The last chunk ended inside an event (a proxied stream, cut by the network): a match
            # or the usage object may straddle the seam. In-process vLLM never gets here.
            seam = partial[-_TAIL:] + data[:_TAIL]
            skip = min(len(partial), _TAIL)
            generated += sum(1 for m in _GENERATED.finditer(seam) if m.start() < skip < m.end())
        self.generated += generated
        if self._usage_event is not None:
            self._usage_event += data
            if len(self._usage_event) > _MAX_PENDING:
                self._usage_event = None  # not an event of ours
            return
        if _USAGE_OBJECT in data or (partial and _USAGE_OBJECT in partial[-_TAIL:] + data[:_TAIL]):
            joined = partial + data
            start = joined.rfind(b"\n\n", 0, joined.index(_USAGE_OBJECT))
            self._usage_event = bytearray(joined[start + 2 if start >= 0 else 0 :])
            return
        if data.endswith(b"\n\n"):
            self._partial = b""
        else:  # keep the current event's bytes so far, to find where it starts
            end = data.rfind(b"\n\n")
            self._partial = data[end + 2 :] if end >= 0 else (partial + data)[-_MAX_PENDING:]

    def feed_event(self, event: bytes) -> None:
        """One whole single-line event (the middleware's hot path): ``feed``'s counts, cheaper.

        vLLM's chat token event is ``data: {…"choices":[{…"delta":{"content":"<token>"},…}]}``: a
        delta whose only member is a non-empty content, and no usage after the choices. Found with
        one backward scan and checked at two places, it counts one, as ``feed``'s scan would;
        anything else (the completions API, reasoning, tool calls, usage, an event after a partial
        one) goes through ``feed``. A key cannot hide inside a JSON string (its quotes are
        escaped), so the bytes found are the delta's key.
        """
        at = event.rfind(_CHAT_TOKEN)  # near the end: a short backward scan
        if at < 0 or self._partial or self._usage_event is not None or not event.endswith(b"}]}\n\n"):
            self.feed(event)
            return
        start = at + len(_CHAT_TOKEN)
        end = event.find(b'"', start)
        if event[end - 1] == 0x5C:  # an escaped quote inside the token: find the real end
            end = _string_end(event, start)
        if end <= start or event[end + 1 : end + 2] != b"}":
            self.feed(event)
            return
        self.answered = True
        self.generated += 1

    def held(self, body: bytes) -> None:
        """A whole (non-streamed) answer's body, plaintext."""
        self.answered = True
        self._whole = body

    def reported(self) -> tuple[int, int] | None:
        """Case 1: the usage in the answer itself (a whole body's, or a stream's usage event)."""
        document = self._whole
        if document is None and self._usage_event is not None:
            event = bytes(self._usage_event).split(b"\n\n", 1)[0]
            document = event.partition(b"data:")[2].strip()
        if document is None:
            return None
        try:
            value = json.loads(document)
        except (ValueError, RecursionError):
            return None
        return usage_numbers(value.get("usage")) if isinstance(value, dict) else None

    def engine_kept(self) -> tuple[int, int] | None:
        """Case 2: what vLLM recorded for middleware in the request's state, if it did."""
        state = self.scope.get("state")
        metadata = state.get("request_metadata") if isinstance(state, Mapping) else None
        return usage_numbers(getattr(metadata, "final_usage_info", None))

    async def finish(self, completion_id: str | None) -> Usage | None:
        """Store this completion's usage (once, after the exchange; signed when served)."""
        if not self.answered or completion_id is None or not is_storable_id(completion_id):
            return None
        # No cancel scope here (anyio's cost per request is the size of everything else this does):
        # every wait below is bounded on its own (the engine call, the shared store's timeouts).
        try:
            usage = await self._usage(completion_id)
            ref = (header(self.scope, USAGE_REF_HEADER) or b"").decode("latin-1")
            if not await self.services.usage.put(usage, ref if is_storable_id(ref) else None):
                log.warning("usage not stored: its completion id or ref is already held")
        except Exception as exc:  # the exchange is over and answered: usage never breaks it
            log.error("usage of a completion not recorded: %s", type(exc).__name__)
            return None
        self.services.metrics.usage_records.labels(usage.source).inc()
        return usage

    async def _usage(self, completion_id: str) -> Usage:
        # vLLM's per-request count first: exact, and nothing to parse.
        numbers = self.engine_kept() or self.reported()
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


def _string_end(data: bytes, start: int) -> int:
    """The index of the quote that closes the JSON string whose contents begin at ``start`` (-1)."""
    end = data.find(b'"', start)
    while end > 0:
        escapes = 0
        while data[end - 1 - escapes] == 0x5C:  # backslash
            escapes += 1
        if escapes % 2 == 0:
            return end
        end = data.find(b'"', end + 1)
    return -1
