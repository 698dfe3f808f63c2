"""Signed usage: the node's own token counts per completion, without changing a byte of the exchange."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from support.servers import running
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.metering import UsageMeter
from tee_inference.middleware import SigningMiddleware
from tee_inference.services import Services
from tee_inference.usage import SignedUsage, Usage, sign_usage
from tee_inference.verify.usage import verify_usage

MODEL = "fake-model"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "How are you today?"}],
    "max_tokens": 12,
    "ignore_eos": True,
}


def _services() -> Services:
    return boot(ServerConfig.build(served_models=(MODEL,)))


def _post(app: SigningMiddleware, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/chat/completions", content=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", **(headers or {})})  # fmt: skip

    return anyio.run(go)


def _get(app: SigningMiddleware, path: str) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get(path)

    return anyio.run(go)


def _first_id(response: httpx.Response) -> str:
    if response.headers["content-type"].startswith("text/event-stream"):
        line = next(x for x in response.text.split("\n") if x.startswith("data: {"))
        return str(json.loads(line[6:])["id"])
    return str(response.json()["id"])


def test_usage_text_layout_round_trips_and_refuses_other_texts() -> None:
    usage = Usage("chatcmpl-abc123", 42, 17, "engine")
    assert usage.text == "chatcmpl-abc123:42:17:engine"
    assert Usage.from_text(usage.text) == usage
    for bad in ("a" * 64 + ":" + "b" * 64, "chatcmpl-x:1:2", "chatcmpl-x:1:2:guessed", "id:-1:2:engine", ""):
        assert Usage.from_text(bad) is None


@pytest.mark.parametrize("stream", [False, True])
def test_every_answer_carries_signed_engine_usage_even_unasked(stream: bool) -> None:
    services = _services()
    app = SigningMiddleware(FakeEngine(MODEL), services=services)
    response = _post(app, {**CHAT, "stream": stream})
    assert response.status_code == 200
    if stream:
        assert '"usage"' not in response.text  # the client did not ask: its stream is vLLM's, unchanged
    record = _get(app, f"/v1/signature/{_first_id(response)}").json()
    usage, checks = verify_usage(
        record, address=services.signer.ecdsa.address, completion_id=_first_id(response)
    )
    assert usage is not None, checks
    assert usage.source == "engine" and usage.completion_tokens == 12  # max_tokens ran out
    assert record["usage"]["total_tokens"] == usage.prompt_tokens + 12
    # The same numbers vLLM would have reported had the client asked.
    asked = _post(app, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(x[6:]) for x in asked.text.split("\n") if x.startswith("data: {")]
    assert events[-1]["usage"]["prompt_tokens"] == usage.prompt_tokens


def test_ed25519_usage_and_a_tampered_record_fails() -> None:
    services = _services()
    app = SigningMiddleware(FakeEngine(MODEL), services=services)
    completion_id = _first_id(_post(app, CHAT))
    record = _get(app, f"/v1/signature/{completion_id}?signing_algo=ed25519").json()
    key = services.signer.ed25519.public_key.hex()
    usage, _ = verify_usage(record, public_key=key)
    assert usage is not None
    forged = {**record, "usage_text": record["usage_text"].replace(f":{usage.prompt_tokens}:", ":1:")}
    assert verify_usage(forged, public_key=key)[0] is None
    disagreeing = {**record, "usage": {**record["usage"], "completion_tokens": 1}}
    assert verify_usage(disagreeing, public_key=key)[1][0].status.value == "fail"
    assert verify_usage(record, public_key=key, completion_id="chatcmpl-other")[0] is None


def test_a_stream_cut_short_is_counted_and_found_by_ref() -> None:
    services = _services()
    app = SigningMiddleware(FakeEngine(MODEL, token_delay_s=0.05), services=services)
    body = {**CHAT, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"x-tee-usage-ref": "gw-ref-1"}
        ) as r:
            received = b""
            for chunk in r.iter_raw():
                received += chunk
                if received.count(b"\n\n") >= 6:  # the role event and five tokens
                    break
        deadline = time.monotonic() + 10
        while (answer := client.get("/v1/usage/gw-ref-1")).status_code == 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answer.status_code == 200, answer.text
        record = answer.json()
        usage, checks = verify_usage(record, address=services.signer.ecdsa.address)
        assert usage is not None, checks
        assert usage.source == "counted"
        assert 5 <= usage.completion_tokens < 200  # what was generated before the client left
        # The prompt as the engine's tokenizer counts it: what the engine itself would have billed.
        full = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}).json()
        assert usage.prompt_tokens == full["usage"]["prompt_tokens"]
        assert client.get("/v1/usage/unknown-ref").json()["error"]["code"] == "usage_not_found"


def test_meter_counts_generated_events_across_any_split() -> None:
    services = _services()
    meter = UsageMeter(services, FakeEngine(MODEL), {"type": "http", "headers": []})
    stream = (
        b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":" there"}}]}\n\n'
        b'data: {"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"id":"t"}]}}]}\n\n'
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    for cut in range(0, len(stream), 7):
        meter = UsageMeter(services, FakeEngine(MODEL), {"type": "http", "headers": []})
        for piece in (stream[:cut], stream[cut : cut + 5], stream[cut + 5 :]):
            meter.feed(piece)
        assert meter.generated == 3 and meter.reported() is None, cut
    usage_event = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3}}\n\n'
    for cut in (0, 20, 50, len(usage_event) - 1):
        meter = UsageMeter(services, FakeEngine(MODEL), {"type": "http", "headers": []})
        meter.feed(stream[:-14] + usage_event[:cut])
        meter.feed(usage_event[cut:] + b"data: [DONE]\n\n")
        assert meter.reported() == (9, 3), cut


_TOKEN_TEXT = st.lists(
    st.sampled_from(["a", " ", '"', "\\", "é", "漢", "}", ":", '{"content":"x"}', '"delta":{"content":"']),
    max_size=6,
).map("".join)


@st.composite
def _vllm_events(draw: st.DrawFn) -> bytes:
    """Events as vLLM writes them, and some it could: reasoning, tool calls, usage, completions."""
    content = draw(_TOKEN_TEXT)
    delta: dict[str, object] = {"content": content}
    if draw(st.booleans()):
        delta = draw(st.sampled_from([
            {"role": "assistant", "content": ""},
            {"content": content, "reasoning_content": draw(_TOKEN_TEXT)},
            {"reasoning_content": draw(_TOKEN_TEXT), "content": content},
            {"tool_calls": [{"id": "t", "function": {"arguments": content}}]},
            {"content": content, "tool_calls": [{"id": "t"}]},
        ]))  # fmt: skip
    chunk: dict[str, object] = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
    }  # fmt: skip
    kind = draw(st.sampled_from(["chat", "chat", "usage-null", "usage", "completion", "finish"]))
    if kind == "usage-null":
        chunk["usage"] = None
    elif kind == "usage":
        chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    elif kind == "completion":
        chunk = {"id": "cmpl-1", "choices": [{"index": 0, "text": content, "finish_reason": None}]}
    elif kind == "finish":
        chunk["choices"][0]["finish_reason"] = "stop"  # type: ignore[index]
    return (
        b"data: "
        + json.dumps(chunk, ensure_ascii=draw(st.booleans()), separators=(",", ":")).encode()
        + b"\n\n"
    )


@given(st.lists(_vllm_events(), max_size=12))
def test_the_hot_path_counts_as_the_full_scan(events: list[bytes]) -> None:
    services = _services()
    scanned = UsageMeter(services, FakeEngine(MODEL), {"type": "http", "headers": []})
    hot = UsageMeter(services, FakeEngine(MODEL), {"type": "http", "headers": []})
    for event in events:
        scanned.feed(event)
        hot.feed_event(event)
    assert (hot.generated, hot.reported(), hot.answered) == (
        scanned.generated,
        scanned.reported(),
        scanned.answered,
    )


def test_sign_usage_binds_both_keys() -> None:
    signer = _services().signer
    signed = sign_usage(signer, Usage("cmpl-1", 3, 4, "counted"))
    assert signed.verifies(signer.ecdsa.address, signer.ed25519.public_key)
    assert SignedUsage.from_record(signed.to_record()) == signed
    other = _services().signer
    assert not signed.verifies(other.ecdsa.address, other.ed25519.public_key)
    assert SignedUsage.from_record({**signed.to_record(), "text": "nope"}) is None


def test_verify_usage_cli(tmp_path: Path) -> None:
    services = _services()
    app = SigningMiddleware(FakeEngine(MODEL), services=services)
    completion_id = _first_id(_post(app, CHAT))
    path = tmp_path / "record.json"
    path.write_text(_get(app, f"/v1/signature/{completion_id}").text)

    def cli(*args: str) -> tuple[int, dict]:
        result = subprocess.run([sys.executable, "-m", "tee_inference", "verify", "usage", str(path), *args,
                                 "--json"], capture_output=True, text=True, timeout=60)  # fmt: skip
        return result.returncode, json.loads(result.stdout)

    code, out = cli("--address", services.signer.ecdsa.address, "--id", completion_id)
    assert code == 0 and out["ok"] and out["attested"]["usage"]["id"] == completion_id
    code, out = cli("--address", _services().signer.ecdsa.address)
    assert code == 1 and [c["name"] for c in out["checks"] if c["status"] == "fail"] == ["usage_signature"]
