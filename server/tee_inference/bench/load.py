"""Load generators: wrk for capacity, and a raw-socket client for time to first byte.

wrk (C, one thread, a Lua script for the POST body) is the generator for throughput and
latency: a Python client on a 2-core machine saturates before a fast server does, and would
measure itself. Where wrk is not installed, the raw-socket client below stands in (the report
says which generator ran). Time to first byte is measured by the raw-socket client at
concurrency 1, where it adds nothing but its own few µs: it reads the response as bytes off a
keep-alive socket, with no HTTP library between the wire and the clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

# Prints one JSON line at the end of a wrk run (latencies in µs).
_WRK_SCRIPT: Final = """
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = os.getenv("TEE_BENCH_BODY")
for line in string.gmatch(os.getenv("TEE_BENCH_HEADERS") or "", "[^\\n]+") do
  local name, value = string.match(line, "^([^:]+):%s*(.*)$")
  if name then wrk.headers[name] = value end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"errors": %d, "non_2xx": %d}\\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass(frozen=True)
class Run:
    """One load run against one target: what a table row is made of."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    ttfb_ms: float | None = None


def wrk_path() -> str | None:
    return shutil.which("wrk")


Headers = tuple[tuple[str, str], ...]


def run_wrk(url: str, body: bytes, concurrency: int, seconds: float, wrk: str, headers: Headers = ()) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_WRK_SCRIPT)
        env = {
            **os.environ,
            "TEE_BENCH_BODY": body.decode(),
            "TEE_BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in headers),
        }
        command = [
            wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            url,
        ]
        out = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result for {url}: {out.stderr.strip()[:200]}")
    r = json.loads(line[4:])
    return Run(
        rps=r["requests"] / (r["duration_us"] / 1e6),
        p50_ms=r["p50_us"] / 1e3,
        p99_ms=r["p99_us"] / 1e3,
        errors=r["errors"] + r["non_2xx"],
    )


def _request(url: str, body: bytes, headers: Headers) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
        f"{extra}content-length: {len(body)}\r\n\r\n"
    ).encode()
    return parts.hostname or "127.0.0.1", parts.port or 80, head + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[float, int]:
    """Sends one request, reads its whole response; (seconds to the first body byte, status)."""
    started = time.perf_counter()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    fields = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
    }
    first: float | None = None
    if b"content-length" in fields:
        remaining = int(fields[b"content-length"])
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 16))
            if not chunk:
                raise ConnectionError("closed mid-body")
            first = first or time.perf_counter()
            remaining -= len(chunk)
    else:  # chunked
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            first = first or time.perf_counter()
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return (first or time.perf_counter()) - started, status


async def _client_load(
    url: str, body: bytes, concurrency: int, seconds: float, headers: Headers
) -> tuple[list[float], list[float], int]:
    host, port, request = _request(url, body, headers)
    latencies: list[float] = []
    first_bytes: list[float] = []
    errors = 0
    until = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < until:
                started = time.perf_counter()
                ttfb, status = await _exchange(reader, writer, request)
                latencies.append(time.perf_counter() - started)
                first_bytes.append(ttfb)
                errors += status != 200
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, first_bytes, errors


def run_client(url: str, body: bytes, concurrency: int, seconds: float, headers: Headers = ()) -> Run:
    """The raw-socket client: throughput, latency and time to first byte (median)."""
    latencies, first_bytes, errors = asyncio.run(_client_load(url, body, concurrency, seconds, headers))
    if not latencies:
        raise RuntimeError(f"no request to {url} completed in {seconds} s")
    ordered = sorted(latencies)
    return Run(
        rps=len(latencies) / seconds,
        p50_ms=statistics.median(ordered) * 1e3,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
        errors=errors,
        ttfb_ms=statistics.median(first_bytes) * 1e3,
    )
