"""Throughput, latency and time to first byte over loopback, every target against the same engine.

Targets, each its own process (so each has a core's worth of event loop, as in production):

- `engine`: the engine alone (`CannedEngine` under uvicorn): the baseline;
- `in-process`: the signing middleware inside the engine's server, built as vLLM builds it
  (`SigningMiddleware(app)`, configuration from the environment, the access log on);
- `proxy`: `tee-inference serve --upstream <engine>`, the standalone proxy, exactly as shipped;
- `passthrough`: the same server and client stack with no middleware: no hashing, no signing;
- any `--compare NAME=URL`: a peer already running against the same engine (`--engine-port`
  fixes the engine's port so the peer can be started first).

Rounds are interleaved (every target once per scenario per round, in a rotating order), so a
load change on a shared machine hits all targets alike; medians and spreads are over rounds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import httpx

from tee_inference.bench.cost import MODEL, Shape, chat_body
from tee_inference.bench.load import Headers, Run, run_client, run_wrk, wrk_path
from tee_inference.engines.vllm import free_port

LOCAL_TARGETS = ("engine", "in-process", "proxy", "passthrough")
COMPLETIONS = "/v1/chat/completions"

_UVICORN = "host='127.0.0.1', port=int(sys.argv[1]), log_level='error', access_log=False"
_ENGINE = (
    "import sys, uvicorn; from tee_inference.bench.engine import CannedEngine; "
    f"uvicorn.run(CannedEngine({MODEL!r}), {_UVICORN})"
)
# What vLLM does with `--middleware tee_inference.middleware.SigningMiddleware`: construct it
# with the app alone, in a process whose environment carries the configuration.
_IN_PROCESS = (
    "import sys, uvicorn; from tee_inference.bench.engine import CannedEngine; "
    "from tee_inference.middleware import SigningMiddleware; "
    f"uvicorn.run(SigningMiddleware(CannedEngine({MODEL!r})), {_UVICORN})"
)
# The standalone proxy's server and client, without the middleware in front.
_PASSTHROUGH = (
    "import sys, uvicorn; from tee_inference.engines.proxy import create_proxy_app; "
    "from tee_inference.config import ServerConfig; from tee_inference.transport import uvicorn_options; "
    f"uvicorn.run(create_proxy_app(sys.argv[2]), lifespan='on', server_header=False, {_UVICORN}, "
    "**uvicorn_options(ServerConfig()))"
)


def _spawn(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_ready(url: str, process: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"benchmark server for {url} exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"benchmark server at {url} did not become healthy")


@contextlib.contextmanager
def local_targets(engine_port: int | None = None) -> Iterator[dict[str, str]]:
    """Starts the engine and the local targets; yields their base URLs; stops them all."""
    processes: list[subprocess.Popen[bytes]] = []
    py = sys.executable
    try:
        port = engine_port or free_port()
        engine = f"http://127.0.0.1:{port}"
        processes.append(_spawn([py, "-c", _ENGINE, str(port)]))
        _wait_ready(engine, processes[-1])
        urls = {"engine": engine}
        env = {"TEE_INFERENCE_SERVED_MODELS": MODEL, "TEE_INFERENCE_TEE": "simulated"}
        commands: dict[str, tuple[list[str], dict[str, str] | None]] = {
            "in-process": ([py, "-c", _IN_PROCESS], env),
            "proxy": (
                [
                    py,
                    "-m",
                    "tee_inference",
                    "serve",
                    "--upstream",
                    engine,
                    "--tee",
                    "simulated",
                    "--host",
                    "127.0.0.1",
                    "--port",
                ],
                None,
            ),
            "passthrough": ([py, "-c", _PASSTHROUGH], None),
        }
        for name, (command, extra_env) in commands.items():
            port = free_port()
            argv = [*command, str(port)] + ([engine] if name == "passthrough" else [])
            processes.append(_spawn(argv, extra_env))
            urls[name] = f"http://127.0.0.1:{port}"
        for name in commands:
            _wait_ready(urls[name], processes[list(urls).index(name)])
        yield urls
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def scenario_key(shape: Shape, concurrency: int) -> str:
    return f"{shape.name} c={concurrency}"


def _measure(
    url: str, body: bytes, concurrency: int, seconds: float, generator: str, headers: Headers
) -> Run:
    wrk = wrk_path() if generator in ("auto", "wrk") else None
    if generator == "wrk" and wrk is None:
        raise RuntimeError("--generator wrk: wrk is not installed")
    if wrk is not None:
        return run_wrk(url + COMPLETIONS, body, concurrency, seconds, wrk, headers)
    return run_client(url + COMPLETIONS, body, concurrency, seconds, headers)


def run_http(
    targets: dict[str, str],
    *,
    shapes: tuple[Shape, ...],
    concurrencies: tuple[int, ...],
    seconds: float,
    rounds: int,
    generator: str = "auto",
    model: str = MODEL,
    headers: Headers = (),
) -> dict[str, Any]:
    """Interleaved rounds over every scenario and target; medians, spreads and ratios."""
    runs: dict[str, dict[str, list[Run]]] = {}
    ttfb: dict[str, dict[str, list[float]]] = {s.name: {t: [] for t in targets} for s in shapes}
    names = list(targets)
    for shape in shapes:  # warm-up: connections, caches, the engine's renderings
        for url in targets.values():
            run_client(url + COMPLETIONS, chat_body(shape.stream, shape.tokens, model), 4, 0.3, headers)
    for round_ in range(rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for shape in shapes:
            body = chat_body(shape.stream, shape.tokens, model)
            for concurrency in concurrencies:
                per = runs.setdefault(scenario_key(shape, concurrency), {t: [] for t in targets})
                for name in order:
                    per[name].append(_measure(targets[name], body, concurrency, seconds, generator, headers))
            for name in order:  # time to first byte, at concurrency 1, by the raw-socket client
                first = run_client(
                    targets[name] + COMPLETIONS, body, 1, max(0.2, seconds / 2), headers
                ).ttfb_ms
                ttfb[shape.name][name].append(first or 0.0)
    return summarize(runs, ttfb, generator_used(generator))


def generator_used(generator: str) -> str:
    return "wrk" if generator != "python" and wrk_path() is not None else "python raw-socket client"


def _ratio(value: float, base: float) -> float | None:
    """value / base, or None where the base completed nothing (a peer that failed every request)."""
    return round(value / base, 3) if base > 0 else None


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def summarize(
    runs: dict[str, dict[str, list[Run]]], ttfb: dict[str, dict[str, list[float]]], generator: str
) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    for key, per in runs.items():
        shape_name, concurrency = key.split(" c=")
        rows: dict[str, Any] = {}
        for name, samples in per.items():
            rows[name] = {
                "rps": _stats([r.rps for r in samples]),
                "p50_ms": _stats([r.p50_ms for r in samples]),
                "p99_ms": _stats([r.p99_ms for r in samples]),
                "errors": sum(r.errors for r in samples),
                "ttfb_c1_ms": _stats(ttfb[shape_name][name]) if ttfb[shape_name][name] else None,
                "rounds": [asdict(r) for r in samples],
            }
        base = rows.get("engine") or next(iter(rows.values()))
        for row in rows.values():
            row["rps_vs_engine"] = _ratio(row["rps"]["median"], base["rps"]["median"])
            row["added_p50_ms"] = round(row["p50_ms"]["median"] - base["p50_ms"]["median"], 3)
        scenarios[key] = {"shape": shape_name, "concurrency": int(concurrency), "targets": rows}
    return {"generator": generator, "scenarios": scenarios, "targets": targets_summary(scenarios)}


def targets_summary(scenarios: dict[str, Any]) -> dict[str, Any]:
    """The issue's proxy targets, per scenario: against the pass-through and against each peer."""
    out: dict[str, Any] = {}
    for key, scenario in scenarios.items():
        rows = scenario["targets"]
        if "proxy" not in rows or "passthrough" not in rows:
            continue
        proxy, bare = rows["proxy"], rows["passthrough"]
        entry = {
            "proxy_rps_vs_passthrough": _ratio(proxy["rps"]["median"], bare["rps"]["median"]),
            "proxy_added_p50_ms_vs_passthrough": round(
                proxy["p50_ms"]["median"] - bare["p50_ms"]["median"], 3
            ),
        }
        for name, row in rows.items():
            if name not in LOCAL_TARGETS:
                entry[f"proxy_rps_vs_{name}"] = _ratio(proxy["rps"]["median"], row["rps"]["median"])
        out[key] = entry
    return out
