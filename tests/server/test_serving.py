"""The signed serving path end to end, on real sockets, with the fake engine.

Covers both in-process shapes: SigningMiddleware → FakeEngine, and SigningMiddleware →
proxy app → a second server (the standalone `--upstream` deployment).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import openai
import pytest

from support.paths import CONFORMANCE
from support.servers import running
from support.signed_client import signed_completion
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.engines.proxy import create_proxy_app
from tee_inference.middleware import SigningMiddleware
from tee_inference.services import Services

MODEL = "fake-model"


def _services(**config: object) -> Services:
    return boot(ServerConfig.build(served_models=(MODEL,), **config))


@pytest.fixture(scope="module", params=["direct", "proxied"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Services]]:
    services = _services()
    if request.param == "direct":
        with running(SigningMiddleware(FakeEngine(MODEL), services=services)) as url:
            yield url, services
    else:
        with running(FakeEngine(MODEL)) as engine_url:
            with running(SigningMiddleware(create_proxy_app(engine_url), services=services)) as url:
                yield url, services


CASES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi é 漢字"}], "max_tokens": 8}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count"}], "stream": True}),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    ("/v1/completions", {"prompt": "The sky is", "max_tokens": 5}),
    ("/v1/completions", {"prompt": "Once", "stream": True, "stream_options": {"include_usage": True}}),
]


@pytest.mark.parametrize(("path", "body"), CASES)
def test_raw_bytes_hash_and_both_signatures(server: tuple[str, Services], path: str, body: dict) -> None:
    url, services = server
    with httpx.Client(base_url=url) as client:
        signed = signed_completion(client, path, body, MODEL)
    assert signed.signing_address == services.signer.ecdsa.address
    assert signed.ed25519_public_key == services.signer.ed25519.public_key.hex()
    if body.get("stream"):
        assert signed.headers["content-type"].startswith("text/event-stream")


def test_openai_sdk_unchanged(server: tuple[str, Services]) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert chat.id.startswith("chatcmpl-") and chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert streamed == whole.choices[0].message.content
    text = client.completions.create(model=MODEL, prompt="The sky", max_tokens=3)
    assert text.id.startswith("cmpl-") and text.choices[0].text
    pieces = [
        c.choices[0].text for c in client.completions.create(model=MODEL, prompt="The sky", stream=True)
    ]
    assert "".join(pieces) == client.completions.create(model=MODEL, prompt="The sky").choices[0].text
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["confidential_compute"] is True  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "model_not_confidential"  # type: ignore[index]
    with httpx.Client(base_url=url) as raw:
        assert raw.get(f"/v1/signature/{chat.id}").status_code == 200


def test_conformance_script(server: tuple[str, Services]) -> None:
    if not CONFORMANCE.is_file():
        pytest.skip("../shared/conformance/check.py is not beside the project")
    url, _ = server
    result = subprocess.run([sys.executable, str(CONFORMANCE), url, "--skip-report"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout


def test_metrics_count_without_content(server: tuple[str, Services]) -> None:
    url, _ = server
    secret_prompt = "my-secret-prompt-text"
    with httpx.Client(base_url=url) as client:
        client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": secret_prompt}]},
        )
        text = client.get("/metrics").text
    assert "tee_inference_signatures_total" in text
    assert 'tee_inference_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "tee_inference_signing_duration_seconds_bucket" in text
    assert secret_prompt not in text
