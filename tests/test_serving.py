"""The signed serving path end to end, on real sockets, with the fake engine.

Covers both in-process shapes: SigningMiddleware → FakeEngine, and SigningMiddleware →
proxy app → a second server (the standalone `--upstream` deployment).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from servers import running
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.engines.proxy import create_proxy_app
from tee_inference.middleware import SigningMiddleware
from tee_inference.services import Services
from tee_inference.signing import ed25519_signature_matches

MODEL = "fake-model"
CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "check.py"


def _services(**config: object) -> Services:
    return Services.start(ServerConfig.build(served_models=(MODEL,), **config))


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


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _first_id(body: bytes, stream: bool) -> str:
    if not stream:
        return str(json.loads(body)["id"])
    line = next(line for line in body.split(b"\n") if line.startswith(b"data: {"))
    return str(json.loads(line[6:])["id"])


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
    # Deliberately not compact and with a trailing newline: the server must hash raw bytes.
    raw = (json.dumps({"model": MODEL, **body}, indent=1, ensure_ascii=False) + "\n").encode()
    stream = bool(body.get("stream"))
    with httpx.Client(base_url=url) as client:
        with client.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
            assert r.status_code == 200
            received = b"".join(r.iter_raw())
            headers = r.headers
        if stream:
            assert received.endswith(b"data: [DONE]\n\n")
            assert headers["content-type"].startswith("text/event-stream")
        completion_id = _first_id(received, stream)
        text = f"{_sha(raw)}:{_sha(received)}"
        ecdsa = client.get(f"/v1/signature/{completion_id}", params={"model": MODEL}).json()
        assert ecdsa["text"] == text and ecdsa["signing_algo"] == "ecdsa"
        signer = Account.recover_message(
            encode_defunct(text=text), signature=bytes.fromhex(ecdsa["signature"])
        )
        assert signer == ecdsa["signing_address"] == services.signer.ecdsa.address
        ed = client.get(
            f"/v1/signature/{completion_id}", params={"model": MODEL, "signing_algo": "ed25519"}
        ).json()
        assert ed["text"] == text and ed["signing_public_key"] == services.signer.ed25519.public_key.hex()
        assert ed25519_signature_matches(
            text, bytes.fromhex(ed["signature"]), bytes.fromhex(ed["signing_public_key"])
        )
        if not stream:
            assert headers["x-signature-text"] == text
            assert headers["x-signing-address"] == signer
            assert headers["x-signature"] == ecdsa["signature"]
            assert headers["content-length"] == str(len(received))


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
