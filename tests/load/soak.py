"""`make soak`: thousands of concurrent signed streams on loopback, some cut off at random.

    python tests/load/soak.py [--streams N] [--concurrency C] [--disconnect-rate P] [--seconds S]

Starts `tee-inference serve --engine fake` as a child process, drives it with a small asyncio
HTTP/1.1 client (raw sockets: thousands of connections on two cores), cuts a random share of the
streams off mid-way, then fetches the signature of every stream that completed and checks it
against that stream's own request and response bytes (ecdsa recovered to the server's
attested address). Bounded in count and in time; prints one summary and exits non-zero unless
lost = 0 and mismatched = 0. The prompts carry the privacy marker; the server's log must not.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tee_inference.signing import recover_ecdsa_address

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.privacy import MARKER, private_prompt
from support.servers import free_port

MODEL = "soak-model"


@dataclass
class Tally:
    completed: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # id, request, response
    disconnected: int = 0
    shed: int = 0
    failed: list[str] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    return int(lines[0].split()[1]), headers


async def one_stream(port: int, n: int, rng: random.Random, cut_rate: float, tally: Tally) -> None:
    body = {"model": MODEL, "stream": n % 10 != 0, "max_tokens": rng.randint(8, 48), "ignore_eos": True,
            "messages": [{"role": "user", "content": private_prompt(f"soak {n}")}]}  # fmt: skip
    raw = json.dumps(body).encode()
    cut_after = rng.randint(1, 20) if rng.random() < cut_rate else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(raw), raw)
        )
        status, headers = await read_head(reader)
        if status == 429:
            tally.shed += 1
            return
        if status != 200:
            tally.failed.append(f"status {status}")
            return
        received = bytearray()
        if "content-length" in headers:
            received += await reader.readexactly(int(headers["content-length"]))
        else:
            chunks = 0
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                received += data[:-2]
                chunks += 1
                if cut_after is not None and chunks >= cut_after:
                    tally.disconnected += 1
                    writer.transport.abort()
                    return
        first = received.split(b"\n\n", 1)[0].removeprefix(b"data: ") if body["stream"] else bytes(received)
        tally.completed.append((json.loads(first)["id"], raw, bytes(received)))
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        tally.failed.append(type(exc).__name__)
    finally:
        writer.close()


async def drive(
    port: int, streams: int, concurrency: int, cut_rate: float, deadline: float, seed: int
) -> Tally:
    tally = Tally()
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)

    async def guarded(n: int) -> None:
        async with gate:
            if time.monotonic() < deadline:
                await one_stream(port, n, rng, cut_rate, tally)

    await asyncio.gather(*(guarded(n) for n in range(streams)))
    return tally


async def verify(url: str, tally: Tally, address: str) -> tuple[int, int]:
    """(lost, mismatched) among the completed streams."""
    lost = mismatched = 0
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        gate = asyncio.Semaphore(64)

        async def check(completion_id: str, request: bytes, response: bytes) -> None:
            nonlocal lost, mismatched
            async with gate:
                r = await client.get(f"/v1/signature/{completion_id}")
            if r.status_code != 200:
                lost += 1
                return
            stored = r.json()
            text = f"{hashlib.sha256(request).hexdigest()}:{hashlib.sha256(response).hexdigest()}"
            signature = bytes.fromhex(stored["signature"])
            if stored["text"] != text or recover_ecdsa_address(text, signature) != address:
                mismatched += 1

        await asyncio.gather(*(check(*entry) for entry in tally.completed))
    return lost, mismatched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--disconnect-rate", type=float, default=0.2)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--seconds", type=float, default=240, help="stop starting streams after this")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = tempfile.NamedTemporaryFile(prefix="soak-server-", suffix=".log", delete=False)  # noqa: SIM115
    command = [sys.executable, "-m", "tee_inference", "serve", "--engine", "fake", "--model", MODEL,
               "--port", str(port), "--fake-token-delay", str(args.token_delay),
               "--max-inflight-completions", str(args.concurrency * 2),
               "--max-connections", str(args.concurrency * 2 + 64)]  # fmt: skip
    server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print(Path(log_file.name).read_text()[-2000:])
                return 1
            time.sleep(0.2)
        address = httpx.get(url + "/v1/attestation/report", timeout=30).json()["signing_address"]
        # Warm up at full concurrency (imports, buffers, the allocator's high-water mark), then
        # take the starting RSS: what the soak must not grow is what a steady load leaves behind.
        asyncio.run(
            drive(port, args.concurrency, args.concurrency, 0.0, time.monotonic() + 60, args.seed + 1)
        )
        rss_start = rss_mib(server.pid)
        started = time.monotonic()
        tally = asyncio.run(drive(port, args.streams, args.concurrency, args.disconnect_rate,
                                  started + args.seconds, args.seed))  # fmt: skip
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # let the server see the last disconnects
        lost, mismatched = asyncio.run(verify(url, tally, address))
        rss_end = rss_mib(server.pid)
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    leaked = MARKER in Path(log_file.name).read_text(errors="replace")
    requests = len(tally.completed) + tally.disconnected + tally.shed + len(tally.failed)
    print(
        f"soak: requests={requests} concurrency={args.concurrency} completed={len(tally.completed)} "
        f"disconnects={tally.disconnected} shed={tally.shed} failed={len(tally.failed)} "
        f"lost={lost} mismatched={mismatched} seconds={elapsed:.1f} "
        f"rss_start_mib={rss_start:.1f} rss_end_mib={rss_end:.1f} marker_in_server_log={leaked}"
    )
    unsigned = [
        line for line in metrics.splitlines() if line.startswith("tee_inference_unsigned_responses_total")
    ]
    print("server:", "; ".join(unsigned) or "no unsigned responses")
    if tally.failed:
        print("failures:", sorted(set(tally.failed)))
    ok = lost == 0 and mismatched == 0 and not tally.failed and not leaked and requests >= args.streams * 0.99
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
