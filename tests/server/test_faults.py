"""Fault injection: the engine dies mid-stream and comes back; trust roots fail, hang or time out.

The engine runs as a real child process behind the proxy, killed with SIGKILL mid-stream: the
client gets a final error event that is signed like any stream, /health says unhealthy, and
serving resumes when the engine is back. A quote source or NVML that hangs or throws costs a
report a 503 within a bound, and completions go on meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import httpx
import pytest

from support.privacy import private_prompt
from support.servers import free_port, running
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.engines.proxy import create_proxy_app
from tee_inference.middleware import SigningMiddleware
from tee_inference.signing import recover_ecdsa_address

MODEL = "fake-model"
_ENGINE = (
    "import sys, uvicorn; from tee_inference.engines.fake import FakeEngine; "
    "uvicorn.run(FakeEngine('fake-model', token_delay_s=0.05), port=int(sys.argv[1]), log_level='error')"
)


@contextmanager
def engine_process(port: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", _ENGINE, str(port)], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
            assert time.monotonic() < deadline and process.poll() is None, "engine did not start"
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_engine_killed_mid_stream_then_back() -> None:
    port = free_port()
    services = boot(ServerConfig.build(served_models=(MODEL,), engine_timeout_s=2.0))
    app = SigningMiddleware(
        create_proxy_app(f"http://127.0.0.1:{port}", request_timeout_s=2.0), services=services
    )
    request = json.dumps({"model": MODEL, "stream": True, "max_tokens": 200, "ignore_eos": True,
                          "messages": [{"role": "user", "content": private_prompt("long")}]}).encode()  # fmt: skip
    with running(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        with engine_process(port) as engine:
            received = bytearray()
            with client.stream("POST", "/v1/chat/completions", content=request,
                               headers={"content-type": "application/json"}) as r:  # fmt: skip
                for chunk in r.iter_raw():
                    received += chunk
                    if received.count(b"\n\n") == 3:
                        os.killpg(engine.pid, signal.SIGKILL)
        last = bytes(received).rstrip(b"\n").split(b"\n\n")[-1]
        assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "engine_error"
        assert b"[DONE]" not in received
        completion_id = json.loads(bytes(received).split(b"\n\n")[0].removeprefix(b"data: "))["id"]
        stored = client.get(f"/v1/signature/{completion_id}").json()
        text = f"{hashlib.sha256(request).hexdigest()}:{hashlib.sha256(received).hexdigest()}"
        assert stored["text"] == text
        assert (
            recover_ecdsa_address(text, bytes.fromhex(stored["signature"])) == services.signer.ecdsa.address
        )
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable"
        refused = client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
        assert refused.status_code in (502, 503) and refused.json()["error"]
        with engine_process(port):
            assert client.get("/health").status_code == 200
            again = client.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
            )
            assert again.status_code == 200 and again.headers["x-signature"]


class HangingQuotes:
    """A quote source that never answers (until released), or one that throws its own error."""

    def __init__(self, inner: object, *, hang: bool = True) -> None:
        self.inner = inner
        self.hang = hang
        self.release = threading.Event()
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def get_quote(self, report_data: bytes) -> bytes:
        self.calls += 1
        if self.hang:
            self.release.wait(60)
            raise TimeoutError("released")
        raise OSError(5, "NVML_ERROR_UNKNOWN")  # a provider's own error type, not ours


@pytest.mark.parametrize("hang", [True, False])
def test_a_hanging_or_failing_trust_root_costs_a_bounded_503_and_completions_go_on(hang: bool) -> None:
    services = boot(ServerConfig.build(served_models=(MODEL,), report_timeout_s=1.0))
    quotes = HangingQuotes(services.attestation.tdx, hang=hang)
    services.attestation.tdx = quotes  # type: ignore[assignment]
    try:
        with running(SigningMiddleware(FakeEngine(MODEL), services=services)) as url:
            results: dict[str, object] = {}

            async def go() -> None:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:

                    async def report(i: int) -> None:
                        started = time.monotonic()
                        r = await client.get("/v1/attestation/report", params={"nonce": f"{i:064x}"})
                        results[f"report{i}"] = (
                            r.status_code,
                            r.json()["error"]["code"],
                            time.monotonic() - started,
                        )

                    async def completions() -> None:
                        ok = 0
                        for _ in range(20):
                            r = await client.post(
                                "/v1/chat/completions",
                                json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                            )
                            ok += r.status_code == 200
                        results["completions"] = ok

                    async with anyio.create_task_group() as tasks:
                        for i in range(12):
                            tasks.start_soon(report, i)
                        tasks.start_soon(completions)

            started = time.monotonic()
            anyio.run(go)
            assert results["completions"] == 20
            for i in range(12):
                status, code, took = results[f"report{i}"]  # type: ignore[misc]
                assert status == 503 and code == "attestation_unavailable"
                assert took < 6, took  # one timeout per wave of 4 collections, at most
            assert time.monotonic() - started < 10
            if hang:
                # Hung threads are bounded: with 8 outstanding, further reports fail at once.
                assert quotes.calls <= 8
    finally:
        quotes.release.set()
