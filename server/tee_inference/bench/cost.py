"""CPU cost of the signing middleware in process, per request and per streamed event, and its floor.

The middleware is built as vLLM builds it (`SigningMiddleware(app)`, configuration from the
`TEE_INFERENCE_*` environment, the access log on) and driven over ASGI against `CannedEngine`
(the fake engine's exact bytes). Each measurement is CPU time of this thread
(`time.thread_time`), so time the scheduler gives to other processes of a shared machine is not
counted; bare and signed runs alternate in rounds and the added cost is the median (and the
spread) of the per-round differences.

The floor is what any signing layer has to do for one answer: sha256 over the request and the
response bytes, one EIP-191 secp256k1 recoverable signature (keccak-256 of the prefixed text,
then the signature) and one ed25519 signature. The cost per streamed event is the slope between
a short and a long stream; what is left at zero events is the per-stream cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from tee_inference.asgi import ASGIApp, Message, one_shot_receive
from tee_inference.bench.engine import CannedEngine
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.logformat import log_handler
from tee_inference.middleware import SigningMiddleware

MODEL = "bench-model"


@dataclass(frozen=True)
class Shape:
    """One kind of answer: streamed or whole, and how many tokens."""

    name: str
    stream: bool
    tokens: int

    def body(self) -> bytes:
        return chat_body(self.stream, self.tokens)


def chat_body(stream: bool, tokens: int, model: str = MODEL) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "benchmark"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    return json.dumps(body).encode()


# Small answers, and answers of at least 64 KiB (about 215 bytes per streamed event, about 6 bytes
# per token in a whole body).
SHAPES = (
    Shape("whole-small", False, 16),
    Shape("whole-64k", False, 12000),
    Shape("stream-small", True, 16),
    Shape("stream-64k", True, 320),
)


def scope_for(path: str = "/v1/chat/completions") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }


async def _discard(message: Message) -> None:
    return None


async def _cpu_per_request(app: ASGIApp, body: bytes, count: int) -> float:
    started = time.thread_time()
    for _ in range(count):
        await app(scope_for(), one_shot_receive(body), _discard)
    return (time.thread_time() - started) / count


async def response_bytes(app: ASGIApp, body: bytes) -> bytes:
    chunks: list[bytes] = []

    async def keep(message: Message) -> None:
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope_for(), one_shot_receive(body), keep)
    return b"".join(chunks)


def floor_cost(request: bytes, response: bytes, count: int) -> float:
    """CPU seconds of the floor for one answer: both sha256s and both signatures."""
    services = _floor_services()
    ecdsa, ed25519 = services.signer.ecdsa, services.signer.ed25519
    started = time.thread_time()
    for _ in range(count):
        text = hashlib.sha256(request).hexdigest() + ":" + hashlib.sha256(response).hexdigest()
        ecdsa.sign(text)
        ed25519.sign(text)
    return (time.thread_time() - started) / count


_FLOOR_SERVICES: list[Any] = []


def _floor_services() -> Any:
    if not _FLOOR_SERVICES:
        _FLOOR_SERVICES.append(boot(ServerConfig.build(served_models=(MODEL,))))
    return _FLOOR_SERVICES[0]


@contextmanager
def vllm_environment() -> Iterator[None]:
    """The process state vLLM gives the middleware: our config in the environment, the access log
    on at INFO (to /dev/null here: the cost of formatting and writing it is counted, not its text)."""
    saved = {k: os.environ.get(k) for k in ("TEE_INFERENCE_SERVED_MODELS", "TEE_INFERENCE_TEE")}
    os.environ.update({"TEE_INFERENCE_SERVED_MODELS": MODEL, "TEE_INFERENCE_TEE": "simulated"})
    access = logging.getLogger("tee_inference.access")
    level, propagate = access.level, access.propagate
    with open(os.devnull, "w") as sink:
        handler = log_handler(sink)  # the handler `ensure_log_handler` gives our loggers in vLLM
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
        try:
            yield
        finally:
            access.removeHandler(handler)
            access.setLevel(level)
            access.propagate = propagate
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values) * 1e6, 2),
        "min": round(min(values) * 1e6, 2),
        "max": round(max(values) * 1e6, 2),
    }


def measure(seconds: float = 8.0, rounds: int = 5, shapes: tuple[Shape, ...] = SHAPES) -> dict[str, Any]:
    """Added CPU µs per answer for each shape, the floor, and the per-event slope."""
    with vllm_environment():
        engine = CannedEngine(MODEL)
        signed = SigningMiddleware(engine)  # as vLLM constructs it: the app alone
        apps: dict[str, ASGIApp] = {"bare": engine, "signed": signed}
        return anyio.run(_measure, apps, seconds, rounds, shapes)


async def _measure(
    apps: dict[str, ASGIApp], seconds: float, rounds: int, shapes: tuple[Shape, ...]
) -> dict[str, Any]:
    budget = seconds / (rounds * len(shapes) * 3)  # three runs per shape and round: bare, signed, floor
    counts: dict[str, int] = {}
    sizes: dict[str, dict[str, int]] = {}
    responses: dict[str, bytes] = {}
    for shape in shapes:
        body = shape.body()
        response = await response_bytes(apps["bare"], body)
        responses[shape.name] = response
        sizes[shape.name] = {
            "request_bytes": len(body),
            "response_bytes": len(response),
            "events": response.count(b"\n\n") if shape.stream else 0,
        }
        once = await _cpu_per_request(apps["signed"], body, 3)  # warm-up and calibration
        counts[shape.name] = max(3, int(budget / max(once, 1e-6)))
    samples: dict[str, dict[str, list[float]]] = {
        s.name: {"bare": [], "signed": [], "added": [], "floor": []} for s in shapes
    }
    for _ in range(rounds):
        for shape in shapes:
            body, count, per = shape.body(), counts[shape.name], samples[shape.name]
            bare = await _cpu_per_request(apps["bare"], body, count)
            signed = await _cpu_per_request(apps["signed"], body, count)
            per["bare"].append(bare)
            per["signed"].append(signed)
            per["added"].append(signed - bare)
            per["floor"].append(floor_cost(body, responses[shape.name], count))
    out: dict[str, Any] = {"unit": "CPU µs per answer", "rounds": rounds, "shapes": {}}
    for shape in shapes:
        per = samples[shape.name]
        out["shapes"][shape.name] = {
            **sizes[shape.name],
            "count_per_round": counts[shape.name],
            **{k: _spread(v) for k, v in per.items()},
        }
    out["summary"] = summarize(out["shapes"])
    return out


def summarize(shapes: dict[str, Any]) -> dict[str, Any]:
    """The two targets: added cost per request against the floor, and per streamed event."""
    summary: dict[str, Any] = {}
    whole = shapes.get("whole-small")
    if whole is not None:
        added, floor = whole["added"]["median"], whole["floor"]["median"]
        summary["added_per_request_us"] = added
        summary["floor_per_request_us"] = floor
        summary["added_over_floor"] = round(added / floor, 2) if floor > 0 else None
    short, long_ = shapes.get("stream-small"), shapes.get("stream-64k")
    if short is not None and long_ is not None and long_["events"] > short["events"]:
        events = long_["events"] - short["events"]
        # Above the floor per event: the floor's own per-byte hashing is subtracted with it.
        slope = (long_["added"]["median"] - short["added"]["median"]) / events
        floor_slope = (long_["floor"]["median"] - short["floor"]["median"]) / events
        summary["added_per_event_us"] = round(slope, 3)
        summary["floor_per_event_us"] = round(floor_slope, 3)
        summary["added_per_stream_us"] = round(short["added"]["median"] - slope * short["events"], 2)
    return summary
