"""`tee-inference bench`: what signing costs, as ratios against a baseline in the same run.

Three measurements, each against its own baseline so that machine noise cancels out:
- `sign`: one completion signed with both algorithms, against hashing alone;
- `asgi`: a request through SigningMiddleware → FakeEngine in-process (no sockets), against
  FakeEngine alone — the middleware's own overhead per request;
- `http`: the same over real sockets (uvicorn child processes), against the bare engine.
Never run as timed assertions in the test suite: numbers are reported, not judged.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx

from tee_inference.asgi import ASGIApp, Message, one_shot_receive
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.engines.vllm import free_port
from tee_inference.middleware import SigningMiddleware

MODEL = "bench-model"


def _chat(stream: bool, tokens: int) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "benchmark"}], "max_tokens": tokens,
            "ignore_eos": True, "stream": stream}  # fmt: skip
    return json.dumps(body).encode()


def _timed(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        count += 1
    return count, time.perf_counter() - started


def bench_sign(seconds: float) -> dict[str, Any]:
    services = boot(ServerConfig.build(served_models=(MODEL,)))
    a, b = hashlib.sha256(b"req").hexdigest(), hashlib.sha256(b"resp").hexdigest()
    n_base, t_base = _timed(lambda: hashlib.sha256(b"x" * 512).hexdigest(), seconds / 2)
    n_sign, t_sign = _timed(lambda: services.signer.sign(a, b), seconds / 2)
    per_sign = t_sign / n_sign
    return {"sign_both_us": round(per_sign * 1e6, 1), "hash_512b_us": round(t_base / n_base * 1e6, 2),
            "ratio": round(per_sign / (t_base / n_base), 1)}  # fmt: skip


async def _asgi_request(app: ASGIApp, body: bytes, path: str = "/v1/chat/completions") -> None:
    async def send(message: Message) -> None:
        return None

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(b"content-type", b"application/json"), (b"host", b"bench")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip
    await app(scope, one_shot_receive(body), send)


def bench_asgi(seconds: float, tokens: int, rounds: int = 5) -> dict[str, Any]:
    services = boot(ServerConfig.build(served_models=(MODEL,)))
    engine = FakeEngine(MODEL)
    apps: dict[str, ASGIApp] = {"baseline": engine, "signed": SigningMiddleware(engine, services=services)}
    out: dict[str, Any] = {}
    for stream in (False, True):
        body = _chat(stream, tokens)

        async def loop(app: ASGIApp, until: float, body: bytes = body) -> int:
            count = 0
            while time.perf_counter() < until:
                await _asgi_request(app, body)
                count += 1
            return count

        # Alternating short rounds, medians: load from elsewhere on the machine hits both sides.
        per_request: dict[str, list[float]] = {name: [] for name in apps}
        anyio.run(loop, apps["signed"], time.perf_counter() + 0.2)  # warm-up
        for _ in range(rounds):
            for name, app in apps.items():
                started = time.perf_counter()
                count = anyio.run(loop, app, started + seconds / (4 * rounds))
                per_request[name].append((time.perf_counter() - started) / count)
        baseline, signed = (statistics.median(per_request[n]) for n in ("baseline", "signed"))
        out["stream" if stream else "whole"] = {
            "baseline_us": round(baseline * 1e6, 1),
            "signed_us": round(signed * 1e6, 1),
            "overhead_us": round((signed - baseline) * 1e6, 1),
            "ratio": round(signed / baseline, 3),
        }
    return out


def _serve(code: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


_BASELINE_SERVER = (
    "import sys, uvicorn; from tee_inference.engines.fake import FakeEngine; "
    f"uvicorn.run(FakeEngine({MODEL!r}), port=int(sys.argv[1]), log_level='error')"
)
_SIGNED_SERVER = (
    "import sys, uvicorn; from tee_inference.engines.fake import FakeEngine; "
    "from tee_inference.middleware import SigningMiddleware; from tee_inference.config import ServerConfig; "
    f"uvicorn.run(SigningMiddleware(FakeEngine({MODEL!r}), ServerConfig(served_models=({MODEL!r},))), "
    "port=int(sys.argv[1]), log_level='error')"
)


async def _load(url: str, body: bytes, stream: bool, seconds: float, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    first_bytes: list[float] = []
    until = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def worker() -> None:
            while time.perf_counter() < until:
                started = time.perf_counter()
                async with client.stream("POST", "/v1/chat/completions", content=body,
                                         headers={"content-type": "application/json"}) as r:  # fmt: skip
                    first = None
                    async for _ in r.aiter_raw():
                        first = first or time.perf_counter()
                latencies.append(time.perf_counter() - started)
                first_bytes.append((first or time.perf_counter()) - started)

        async with anyio.create_task_group() as tasks:
            for _ in range(concurrency):
                tasks.start_soon(worker)
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": statistics.quantiles(latencies, n=100)[98] * 1e3
        if len(latencies) > 100
        else max(latencies) * 1e3,
        "ttfb_p50_ms": statistics.median(first_bytes) * 1e3,
    }


def _wait_ready(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"benchmark server at {url} did not start")


def bench_http(seconds: float, tokens: int, concurrency: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    servers = {}
    try:
        for name, code in (("baseline", _BASELINE_SERVER), ("signed", _SIGNED_SERVER)):
            port = free_port()
            servers[name] = (_serve(code, port), f"http://127.0.0.1:{port}")
        for _, url in servers.values():
            _wait_ready(url)
        for stream in (False, True):
            body = _chat(stream, tokens)
            runs = {name: anyio.run(_load, url, body, stream, seconds / 4, concurrency)
                    for name, (_, url) in servers.items()}  # fmt: skip
            key = "stream" if stream else "whole"
            out[key] = {name: {k: round(v, 2) for k, v in r.items()} for name, r in runs.items()}
            out[key]["rps_ratio"] = round(runs["signed"]["rps"] / runs["baseline"]["rps"], 3)
            out[key]["p50_ratio"] = round(runs["signed"]["p50_ms"] / runs["baseline"]["p50_ms"], 3)
    finally:
        for process, _ in servers.values():
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(10)
    return out
