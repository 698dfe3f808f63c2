"""The same signed-serving checks against a real vLLM engine (CPU build here).

Slow (each deployment starts vLLM: ~30-40 s) and run by `make test-slow`, which builds the
engine venv and the model and passes their paths in the environment. Two deployments:
the middleware loaded inside vLLM (`--middleware`, the production default) and vLLM on a
private port behind the standalone proxy.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from support.paths import CONFORMANCE, REPO
from support.servers import free_port
from support.signed_client import signed_completion
from support.vllm_server import make_run_command, serving

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module", params=["in-process", "proxy"])
def vllm_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    command = make_run_command(port, *(["--proxy"] if request.param == "proxy" else []))
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    url = f"http://127.0.0.1:{port}"
    with serving(command, url, log):
        yield url
        # Our structured access line, inside vLLM too (vLLM configures only its own loggers).
        text = log.read_text(errors="replace")
        assert '"request":"access"' in text and '"route":"/v1/chat/completions"' in text, text[-3000:]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi é 漢字"}], "max_tokens": 8}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to 5"}], "max_tokens": 12,
                                  "stream": True, "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"prompt": "The sky is", "max_tokens": 6}),
        ("/v1/completions", {"prompt": "Once upon", "max_tokens": 6, "stream": True}),
    ],
)  # fmt: skip
def test_signed_completion_from_real_vllm(vllm_server: str, path: str, body: dict) -> None:
    with httpx.Client(base_url=vllm_server, timeout=120) as client:
        signed = signed_completion(client, path, body, MODEL)
    assert signed.completion_id.startswith(("chatcmpl-", "cmpl-"))


def test_openai_sdk_gets_the_right_answer(vllm_server: str) -> None:
    client = openai.OpenAI(base_url=vllm_server + "/v1", api_key="unused", timeout=120)
    answer = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )  # fmt: skip
    assert "Paris" in (answer.choices[0].message.content or "")
    pieces = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=16, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )  # fmt: skip
    assert "Paris" in "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_conformance_script_against_vllm(vllm_server: str) -> None:
    if not CONFORMANCE.is_file():
        pytest.skip("../shared/conformance/check.py is not beside the project")
    result = subprocess.run([sys.executable, str(CONFORMANCE), vllm_server], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_run_verifies_against_the_committed_measurements(vllm_server: str) -> None:
    """`make run`'s server against measurements/expected.json as committed: platform, compose, image,
    and the weights root the server measured at boot from the prepared model."""
    result = subprocess.run(
        [sys.executable, "-m", "tee_inference", "verify", "url", vllm_server, "--model", MODEL, "--allow-simulated",
         "--allow-plaintext", "--expect", str(REPO / "measurements" / "expected.json"), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    verdict = json.loads(result.stdout)
    failed = [c for c in verdict["checks"] if c["status"] == "fail"]
    assert result.returncode == 0, failed
    statuses = {c["name"]: c["status"] for c in verdict["checks"]}
    assert statuses["measurements"] == "pass" and statuses["mrconfigid"] == "pass"
    assert verdict["relaxed"] == ["tls_binding"]  # plain http on loopback, accepted by name


def test_make_run_tls_with_the_verifying_client(tmp_path: Path) -> None:
    """`make run-tls`: vLLM's own uvicorn ends TLS with our key (tmpfs), and the OpenAI SDK runs
    unchanged through the verifying client, streamed and not, while verify url pins the channel."""
    from tee_inference.client import AttestedClient

    port = free_port()
    url = f"https://127.0.0.1:{port}"
    loose = ssl.create_default_context()
    loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE  # only to wait for health
    with serving(make_run_command(port, "--tls", "self-signed"), url, tmp_path / "server.log", loose):
        expected = REPO / "measurements" / "expected.json"
        with AttestedClient(url, model=MODEL, expect=expected, allow_simulated=True, timeout=120) as http:
            llm = openai.OpenAI(base_url=url + "/v1", api_key="unused", http_client=http)
            answer = llm.chat.completions.create(
                model=MODEL, temperature=0, max_tokens=12, messages=[{"role": "user", "content": "Capital of France?"}]
            )  # fmt: skip
            assert answer.choices[0].message.content
            chunks = list(llm.chat.completions.create(
                model=MODEL, max_tokens=8, stream=True, messages=[{"role": "user", "content": "Count to 3"}]
            ))  # fmt: skip
            assert chunks
        result = subprocess.run(
            [sys.executable, "-m", "tee_inference", "verify", "url", url, "--model", MODEL, "--allow-simulated",
             "--expect", str(expected), "--json"], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        verdict = json.loads(result.stdout)
        assert result.returncode == 0, [c for c in verdict["checks"] if c["status"] == "fail"]
        assert verdict["relaxed"] == []


def test_engine_errors_come_back_in_the_envelope(vllm_server: str) -> None:
    with httpx.Client(base_url=vllm_server, timeout=60) as client:
        cases = [
            client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": -1,
                                                      "messages": [{"role": "user", "content": "x"}]}),
            client.post("/v1/completions", json={"model": MODEL}),
            client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                      "max_tokens": 100_000}),
            client.get("/v1/tokenize"),
            client.get("/v1/chat/completions"),
        ]  # fmt: skip
    for response in cases:
        assert 400 <= response.status_code < 500, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code", "status"}
        assert error["status"] == response.status_code


def test_metrics_combine_vllms_and_ours(vllm_server: str) -> None:
    text = httpx.get(vllm_server + "/metrics", timeout=30).text
    assert "vllm:" in text  # the engine's own metrics, in-process or proxied
    assert "tee_inference_requests_total" in text


def test_vllm_never_takes_a_client_chosen_id(vllm_server: str) -> None:
    chat = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=vllm_server, timeout=120) as client:
        ids = [client.post("/v1/chat/completions", json=chat, headers={"x-request-id": "victim"}).json()["id"]
               for _ in range(2)]  # fmt: skip
        assert ids[0] != ids[1] and "victim" not in ids[0]
        refused = client.post("/v1/chat/completions", json={**chat, "request_id": "victim"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "request_id_not_allowed"


def test_vllm_stream_inband_signature_before_done(vllm_server: str) -> None:
    raw = json.dumps({"model": MODEL, "max_tokens": 6, "stream": True,
                      "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
    with httpx.Client(base_url=vllm_server, timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", content=raw,
                           headers={"content-type": "application/json", "x-signature-inband": "1"}) as r:  # fmt: skip
            received = b"".join(r.iter_raw())
        before, _, after = received.partition(b"\n: signature ")
        line, _, rest = after.partition(b"\n\n")
        assert rest == b"data: [DONE]\n\n"
        document = json.loads(line)
        engine_bytes = before + b"\n" + rest
        import hashlib

        text = f"{hashlib.sha256(raw).hexdigest()}:{hashlib.sha256(engine_bytes).hexdigest()}"
        assert document["text"] == text
        assert client.get(f"/v1/signature/{document['id']}").json()["text"] == text
