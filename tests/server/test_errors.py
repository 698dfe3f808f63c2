"""Every error path answers the one envelope of SPEC §6, with the right status, never a 500."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from support.servers import running
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.engines.proxy import create_proxy_app
from tee_inference.middleware import SigningMiddleware

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
JSON = {"content-type": "application/json"}


def assert_envelope(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "status"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["status"] == status
    assert "Traceback" not in r.text
    if code is not None:
        assert error["code"] == code
    return error


@pytest.fixture(scope="module", params=["direct", "proxied"])
def client(request: pytest.FixtureRequest, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    monkeypatch_module.setenv("TEST_TOKEN", "s3cret-token")
    config = ServerConfig.build(served_models=(MODEL,), api_key_env="TEST_TOKEN", max_request_bytes=4096)
    services = boot(config)
    headers = {"authorization": "Bearer s3cret-token"}
    if request.param == "direct":
        with running(SigningMiddleware(FakeEngine(MODEL), services=services)) as url:
            with httpx.Client(base_url=url, headers=headers) as c:
                yield c
    else:
        with (
            running(FakeEngine(MODEL)) as engine,
            running(SigningMiddleware(create_proxy_app(engine), services=services)) as url,
        ):
            with httpx.Client(base_url=url, headers=headers) as c:
                yield c


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_malformed_json(client: httpx.Client) -> None:
    assert_envelope(
        client.post("/v1/chat/completions", content=b'{"model": ', headers=JSON), 400, "invalid_json"
    )
    assert_envelope(
        client.post("/v1/chat/completions", content=b"\xff\xfe", headers=JSON), 400, "invalid_json"
    )
    assert_envelope(client.post("/v1/chat/completions", content=b"[1, 2]", headers=JSON), 400, "invalid_json")


def test_missing_or_wrong_model(client: httpx.Client) -> None:
    error = assert_envelope(client.post("/v1/chat/completions", json={"messages": []}), 400)
    assert error["param"] == "model"
    error = assert_envelope(client.post("/v1/completions", json={"model": "llama", "prompt": "x"}), 400,
                            "model_not_confidential")  # fmt: skip
    assert error["type"] == "invalid_request_error" and error["param"] == "model"


def test_engine_validation_errors_become_the_envelope(client: httpx.Client) -> None:
    assert_envelope(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": -1}), 400)
    assert_envelope(client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400)
    assert_envelope(client.post("/v1/completions", json={"model": MODEL}), 400)


def test_wrong_content_type(client: httpx.Client) -> None:
    r = client.post(
        "/v1/chat/completions",
        content=b"model=x",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert_envelope(r, 415, "unsupported_media_type")
    assert_envelope(client.post("/v1/chat/completions", content=b"{}"), 415)


def test_body_over_the_limit(client: httpx.Client) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_envelope(client.post("/v1/chat/completions", json=big), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no content-length: the limit must hold while reading
        yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    assert_envelope(client.post("/v1/chat/completions", content=chunks(), headers=JSON), 413)


def test_unknown_route_and_wrong_method(client: httpx.Client) -> None:
    assert_envelope(client.get("/v1/nope"), 404, "not_found")
    assert_envelope(client.get("/v1/tokenize"), 404)  # engine routes we do not sign stay closed
    r = client.get("/v1/chat/completions")
    assert_envelope(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    assert_envelope(client.post("/v1/models"), 405)
    assert_envelope(client.delete("/v1/signature/chatcmpl-x"), 405)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/embeddings",
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/moderations",
        "/v1/fine_tuning/jobs",
    ],
)
def test_other_modalities_not_available(client: httpx.Client, path: str) -> None:
    assert_envelope(client.post(path, json={"model": MODEL, "input": "x"}), 503, "not_available")


def test_signature_api_errors(client: httpx.Client) -> None:
    assert_envelope(client.get("/v1/signature/chatcmpl-unknown"), 404, "signature_not_found")
    assert_envelope(client.get("/v1/signature/" + "x" * 400), 404)
    assert_envelope(client.get("/v1/signature/chatcmpl-x", params={"signing_algo": "rsa"}), 400)
    assert_envelope(
        client.get("/v1/signature/chatcmpl-x", params={"model": "other"}), 400, "model_not_confidential"
    )


def test_auth(client: httpx.Client) -> None:
    base = str(client.base_url)
    with httpx.Client(base_url=base) as anonymous:
        r = anonymous.post("/v1/chat/completions", json=CHAT)
        assert_envelope(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_envelope(anonymous.get("/v1/models", headers={"authorization": "Bearer wrong"}), 401)
        assert_envelope(anonymous.get("/v1/models", headers={"authorization": "s3cret-token"}), 401)
        assert_envelope(anonymous.get("/metrics"), 401)
        assert_envelope(anonymous.get("/v1/nope"), 401)  # no route discovery without the token
        assert anonymous.get("/health").status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("depth", [1_100, 1_900])
def test_deeply_nested_json_is_a_400_not_a_recursion_trace(
    client: httpx.Client, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Within the 4 KiB body limit of this fixture; test_limits sends 100,000 levels.
    for body in (
        b"[" * depth + b"]" * depth,
        b'{"model": "fake-model", "x": ' + b"[" * depth + b"]" * depth + b"}",
    ):
        r = client.post("/v1/chat/completions", content=body, headers=JSON)
        error = assert_envelope(r, 400, "invalid_json")
        assert r.headers["x-should-retry"] == "false"
        assert "ecursion" not in error["message"]
    assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(client: httpx.Client, scheme: str) -> None:
    base = str(client.base_url)
    with httpx.Client(base_url=base) as other:
        ok = other.get("/v1/models", headers={"authorization": f"{scheme} s3cret-token"})
        assert ok.status_code == 200, ok.text
        # The token itself is compared exactly.
        assert_envelope(other.get("/v1/models", headers={"authorization": f"{scheme} S3CRET-TOKEN"}), 401)
        assert_envelope(other.get("/v1/models", headers={"authorization": f"{scheme}  s3cret-token x"}), 401)
        assert_envelope(other.get("/v1/models", headers={"authorization": f"{scheme}s3cret-token"}), 401)


def test_a_lone_surrogate_in_the_prompt_is_answered(client: httpx.Client) -> None:
    # Valid JSON (an escaped lone surrogate) that no UTF-8 encoder accepts as text.
    body = b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800 and \\udfff"}]}'
    r = client.post("/v1/chat/completions", content=body, headers=JSON)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_permanent_errors_tell_the_sdk_not_to_retry(client: httpx.Client) -> None:
    """The OpenAI SDK retries 5xx and 429 unless `x-should-retry: false`; 4xx it never retries."""
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert_envelope(r, 503, "not_available")
    assert r.headers["x-should-retry"] == "false"
    for r in (client.get("/v1/nope"), client.post("/v1/chat/completions", content=b"{", headers=JSON)):
        assert r.headers["x-should-retry"] == "false"
    assert "x-should-retry" not in client.get("/v1/models").headers
