"""Real vLLM (CPU build) with `--api-server-count 2`: one key, one store, any process answers any id.

Slow (starts vLLM, ~40 s) and run by `make test-slow`. vLLM spawns two API processes, each loading
our middleware; each resumes the launcher's boot (one key) and reaches the launcher's store (one
store), so a signature is fetchable whichever process a connection lands on. Fresh connections are
spread over the processes by the kernel; 16 lookups per id all land on one process with
probability 2^-15, and the launcher's log shows both processes took the boot.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.paths import REPO
from support.servers import free_port
from support.signed_client import signed_completion
from support.vllm_server import make_run_command, serving
from tee_inference.verify.usage import verify_usage

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-scale") / "server.log"
    url = f"http://127.0.0.1:{port}"
    with serving(make_run_command(port, "--api-server-count", "2"), url, log):
        yield url, log


def _fresh(url: str) -> httpx.Client:
    # A new connection each time: the kernel hands it to either API process.
    return httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_keepalive_connections=0))


def test_two_api_processes_sign_with_one_key_and_share_one_store(two_processes: tuple[str, Path]) -> None:
    url, log = two_processes
    assert log.read_text(errors="replace").count("boot handed to process") == 2
    with _fresh(url) as client:
        address = client.get("/v1/attestation/report").json()["signing_address"]
    signed = []
    for i in range(6):
        body = {
            "messages": [{"role": "user", "content": f"Say a number: {i}"}],
            "max_tokens": 6,
            "stream": i % 2 == 0,
        }
        with _fresh(url) as client:
            signed.append(signed_completion(client, "/v1/chat/completions", body, MODEL))
    assert {s.signing_address for s in signed} == {address}
    for completion in signed:
        for _ in range(16):
            with _fresh(url) as client:
                answer = client.get(f"/v1/signature/{completion.completion_id}")
            assert answer.status_code == 200, answer.text
            record = answer.json()
            assert record["text"] == completion.text and record["signing_address"] == address
        # vLLM's own count, for streams that did not ask for usage too (request.state).
        usage, checks = verify_usage(record, address=address, completion_id=completion.completion_id)
        assert usage is not None and usage.source == "engine" and usage.completion_tokens > 0, checks


def test_a_tenants_cache_salt_is_accepted_by_vllm_and_the_signature_covers_the_client_bytes(
    two_processes: tuple[str, Path],
) -> None:
    url, _ = two_processes
    raw = json.dumps(
        {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    ).encode()
    with _fresh(url) as client:
        answer = client.post("/v1/chat/completions", content=raw,
                             headers={"content-type": "application/json", "x-tee-tenant": "alice"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-signature-text"].split(":")[0] == hashlib.sha256(raw).hexdigest()


def test_a_stream_cut_short_is_counted_by_the_node(two_processes: tuple[str, Path]) -> None:
    url, _ = two_processes
    body = {
        "model": MODEL,
        "max_tokens": 200,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell a long story"}],
    }
    with _fresh(url) as client, client.stream("POST", "/v1/chat/completions", json=body,
                                             headers={"x-tee-usage-ref": "slow-ref-1"}) as response:  # fmt: skip
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b"\n\n") >= 6:
                break
    deadline = time.monotonic() + 30
    while True:
        with _fresh(url) as client:
            answer = client.get("/v1/usage/slow-ref-1")
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer.status_code == 200, answer.text
    record = answer.json()
    assert record["usage"]["source"] == "counted" and 5 <= record["usage"]["completion_tokens"] < 200
    assert record["usage"]["prompt_tokens"] > 10  # the engine's tokenizer, with the chat template


def test_verify_url_against_the_two_process_node(two_processes: tuple[str, Path]) -> None:
    url, _ = two_processes
    result = subprocess.run(
        [sys.executable, "-m", "tee_inference", "verify", "url", url, "--model", MODEL, "--allow-simulated",
         "--allow-plaintext", "--expect", str(REPO / "measurements" / "expected.json"), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    verdict = json.loads(result.stdout)
    assert result.returncode == 0, [c for c in verdict["checks"] if c["status"] == "fail"]
