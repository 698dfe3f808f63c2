"""A deterministic engine that speaks vLLM's OpenAI wire format byte for byte.

For tests and as the benchmark baseline: it answers chat and text completions, streaming
or not, with the same JSON field order, the same compact encoding and the same SSE framing
as vLLM 0.32 (see tests/data/vllm_wire/, captured from a real vLLM), so that everything in
front of it is exercised exactly as it would be in front of vLLM. The text it "generates"
is a pure function of the prompt: the same request always gets the same words.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tee_inference.asgi import Receive, Scope, Send, read_body

SYSTEM_FINGERPRINT = "vllm-fake"
_VOCABULARY = (
    "the", "model", "answers", "with", "care", "and", "a", "signed", "reply", "that", "anyone",
    "can", "verify", "inside", "enclave", "quote", "binds", "key", "to", "nonce", "each", "token",
    "streams", "past", "hash", "of", "bytes", "café", "naïve", "漢字", "über", "résumé",
)  # fmt: skip


def _json(value: Any) -> bytes:
    # What Starlette's JSONResponse and pydantic's model_dump_json both produce for vLLM.
    # backslashreplace: a lone surrogate (say, in a model name echoed in an error) becomes its
    # JSON escape rather than an encoding error.
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace")


class _Lenient(BaseModel):
    # vLLM accepts (and ignores) fields it does not know; so does the fake.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ChatMessageIn(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    n: Literal[1] = 1
    ignore_eos: bool = False


class CompletionRequest(_Lenient):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    n: Literal[1] = 1
    ignore_eos: bool = False


def generate(prompt: str, max_tokens: int | None, *, ignore_eos: bool = False) -> tuple[list[str], str]:
    """Deterministic tokens for a prompt, and the finish reason ("stop" or "length")."""
    # surrogatepass: JSON may carry a lone surrogate (`"\\ud800"`), which is not UTF-8 text.
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest()
    # vLLM's `ignore_eos` generates up to max_tokens; benchmarks and long-stream tests use it.
    natural = max_tokens + 1 if ignore_eos and max_tokens else 6 + digest[0] % 20
    count = natural if max_tokens is None else min(natural, max_tokens)
    tokens: list[str] = []
    block = digest
    for i in range(count):
        if i % 32 == 0 and i:
            block = hashlib.sha256(block).digest()
        word = _VOCABULARY[block[i % 32] % len(_VOCABULARY)]
        tokens.append(word.capitalize() if i == 0 else " " + word)
    if count == natural and tokens:
        tokens[-1] += "."
    return tokens, ("stop" if count == natural else "length")


def _prompt_tokens(text: str) -> int:
    return max(1, len(text.split()))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


class FakeEngine:
    """An ASGI app with vLLM's routes for one model."""

    def __init__(
        self,
        model: str = "fake-model",
        *,
        token_delay_s: float = 0.0,
        max_model_len: int = 2048,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.token_delay_s = token_delay_s
        self.max_model_len = max_model_len
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        method, path = scope["method"], scope["path"]
        if (method, path) == ("GET", "/health"):
            await _respond(send, 200, b"", content_type=None)
        elif (method, path) == ("GET", "/version"):
            await _respond(send, 200, _json({"version": "fake"}))
        elif (method, path) == ("GET", "/v1/models"):
            await _respond(send, 200, _json(self.model_list()))
        elif (method, path) == ("POST", "/v1/chat/completions"):
            await self.completion(scope, receive, send, chat=True)
        elif (method, path) == ("POST", "/v1/completions"):
            await self.completion(scope, receive, send, chat=False)
        elif (method, path) == ("POST", "/tokenize"):
            await self.tokenize(receive, send)
        else:
            await _respond(send, 404, _json({"detail": "Not Found"}))

    @staticmethod
    def weights_root() -> str:
        """What stands in for the fake model's weights root: a digest of what decides its output."""
        identity = "tee-inference fake engine v1\n" + "\n".join(_VOCABULARY)
        return hashlib.sha256(identity.encode("utf-8")).hexdigest()

    def model_list(self) -> dict[str, Any]:
        created = int(self.clock())
        card = {
            "id": self.model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{uuid.uuid4().hex}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        return {"object": "list", "data": [card]}

    async def completion(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        body = await read_body(receive)
        if body is None:
            return  # the client left
        try:
            raw = json.loads(body)
            request: ChatRequest | CompletionRequest = (
                ChatRequest.model_validate(raw) if chat else CompletionRequest.model_validate(raw)
            )
        except ValueError as exc:
            await _respond(send, 400, _json(_error(_validation_message(exc), 400)))
            return
        if request.model is not None and request.model != self.model:
            message = f"The model `{request.model}` does not exist."
            await _respond(send, 404, _json(_error(message, 404, type_="NotFoundError", param="model")))
            return
        if isinstance(request, ChatRequest):
            prompt = "\n".join(_message_text(m) for m in request.messages)
            limit = request.max_completion_tokens or request.max_tokens
        else:
            prompt = request.prompt if isinstance(request.prompt, str) else "".join(request.prompt)
            limit = request.max_tokens
        tokens, finish = generate(prompt, limit, ignore_eos=request.ignore_eos)
        prompt_tokens = _count_prompt(request)
        # vLLM keeps each request's usage for middleware in `request.state` (the scope's state),
        # set before `data: [DONE]` only when the generation completes.
        metadata = RequestMetadata()
        scope.setdefault("state", {})["request_metadata"] = metadata
        finished = UsageInfo(prompt_tokens, len(tokens))
        reply = _Reply(
            completion_id=("chatcmpl-" if chat else "cmpl-") + _base_request_id(scope, raw),
            created=int(self.clock()),
            model=self.model,
            chat=chat,
            tokens=tokens,
            finish=finish,
            prompt_tokens=prompt_tokens,
        )
        if not request.stream:
            metadata.final_usage_info = finished
            await _respond(send, 200, _json(reply.whole()))
            return
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        async with anyio.create_task_group() as tasks:
            # Like vLLM, stop generating the moment the client goes away.
            tasks.start_soon(_cancel_on_disconnect, receive, tasks.cancel_scope)
            for event in reply.events(include_usage):
                if self.token_delay_s:
                    await anyio.sleep(self.token_delay_s)
                if event == b"data: [DONE]\n\n":
                    metadata.final_usage_info = finished
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            tasks.cancel_scope.cancel()

    async def tokenize(self, receive: Receive, send: Send) -> None:
        """vLLM's `POST /tokenize` (chat messages or a prompt): the count the fake would bill."""
        try:
            raw = json.loads(await read_body(receive) or b"")
            chat = isinstance(raw, dict) and "messages" in raw
            request: ChatRequest | CompletionRequest = (
                ChatRequest.model_validate(raw) if chat else CompletionRequest.model_validate(raw)
            )
        except ValueError as exc:
            await _respond(send, 400, _json(_error(_validation_message(exc), 400)))
            return
        count = _count_prompt(request)
        answer = {"count": count, "max_model_len": self.max_model_len, "tokens": list(range(count)),
                  "token_strs": None}  # fmt: skip
        await _respond(send, 200, _json(answer))


@dataclass
class UsageInfo:
    """The fields of vLLM's `UsageInfo` that middleware reads."""

    prompt_tokens: int
    completion_tokens: int


@dataclass
class RequestMetadata:
    """vLLM's `RequestResponseMetadata`: `final_usage_info` is set once the answer is complete."""

    final_usage_info: UsageInfo | None = None


def _count_prompt(request: ChatRequest | CompletionRequest) -> int:
    if isinstance(request, ChatRequest):
        text = "\n".join(_message_text(m) for m in request.messages)
        return _prompt_tokens(text) + 4 * len(request.messages)
    return _prompt_tokens(request.prompt if isinstance(request.prompt, str) else "".join(request.prompt))


class _Reply:
    """One deterministic answer, rendered as a whole body or as SSE events."""

    def __init__(
        self,
        *,
        completion_id: str,
        created: int,
        model: str,
        chat: bool,
        tokens: list[str],
        finish: str,
        prompt_tokens: int,
    ) -> None:
        self.id = completion_id
        self.created = created
        self.model = model
        self.chat = chat
        self.tokens = tokens
        self.finish = finish
        self.prompt_tokens = prompt_tokens

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def whole(self) -> dict[str, Any]:
        text = "".join(self.tokens)
        usage = {**_usage(self.prompt_tokens, len(self.tokens)), "prompt_tokens_details": None,
                 "completion_tokens_details": None}  # fmt: skip
        if self.chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            }
            choice = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": self.finish,
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
            return {
                **self._head("chat.completion"),
                "choices": [choice],
                "service_tier": None,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "usage": usage,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "prompt_text": None,
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": self.finish,
            "stop_reason": None,
            "token_ids": None,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "routed_experts": None,
        }
        return {
            **self._head("text_completion"),
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }

    def _chunk(self, piece: str, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.chat:
            choice = {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        if finish is not None or not self.chat:
            choice["stop_reason"] = None
        if not self.chat:
            choice["prompt_token_ids"] = None
        choice["token_ids"] = None
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(object_), "choices": [choice]}

    def events(self, include_usage: bool) -> Iterator[bytes]:
        """vLLM's stream: role delta first (chat); a token per event; the finish reason on the
        last token when the length ran out, or on an empty delta after it at end of sequence;
        the system fingerprint on the final event (the usage event when asked for)."""
        if self.chat:
            first = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield _event({**self._head("chat.completion.chunk"), "choices": [first], "prompt_token_ids": None,
                          "prompt_text": None})  # fmt: skip
        chunks = [self._chunk(token, None) for token in self.tokens]
        if self.finish == "length" and chunks:
            chunks[-1] = self._chunk(self.tokens[-1], "length")
        else:
            chunks.append(self._chunk("", self.finish))
        if include_usage:
            usage = _usage(self.prompt_tokens, len(self.tokens))
            object_ = "chat.completion.chunk" if self.chat else "text_completion"
            chunks.append({**self._head(object_), "choices": [], "usage": usage})
        chunks[-1]["system_fingerprint"] = SYSTEM_FINGERPRINT
        for chunk in chunks:
            yield _event(chunk)
        yield b"data: [DONE]\n\n"


def _event(value: dict[str, Any]) -> bytes:
    return b"data: " + _json(value) + b"\n\n"


def _base_request_id(scope: Scope, body: dict[str, Any]) -> str:
    """vLLM's choice of id: the `X-Request-Id` header, else the body's `request_id`, else random
    (vLLM's `_base_request_id`). Faithful on purpose: the signing layer must not rely on the
    engine to keep clients from choosing ids."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return bytes(value).decode("latin-1")
    chosen = body.get("request_id")
    return chosen if isinstance(chosen, str) else uuid.uuid4().hex


def _message_text(message: ChatMessageIn) -> str:
    if isinstance(message.content, str):
        return message.content
    if isinstance(message.content, list):
        return " ".join(str(part.get("text", "")) for part in message.content)
    return ""


def _error(
    message: str, code: int, *, type_: str = "BadRequestError", param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _validation_message(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return "request body is not valid JSON"


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _respond(
    send: Send, status: int, body: bytes, *, content_type: bytes | None = b"application/json"
) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
