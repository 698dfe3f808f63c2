"""Admission control: shed with 429 + Retry-After before the engine saturates."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from support.servers import running
from tee_inference.admission import AdmissionControl
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.middleware import SigningMiddleware

MODEL = "fake-model"
SLOW = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 20,
        "ignore_eos": True}  # fmt: skip


def test_completions_over_the_in_flight_bound_are_shed_with_retry_after() -> None:
    services = boot(ServerConfig.build(served_models=(MODEL,), max_inflight_completions=2))
    with running(SigningMiddleware(FakeEngine(MODEL, token_delay_s=0.1), services=services)) as url:
        with httpx.Client(base_url=url, timeout=20) as client:
            with (
                client.stream("POST", "/v1/chat/completions", json=SLOW) as a,
                client.stream("POST", "/v1/chat/completions", json=SLOW) as b,
            ):
                # Keep the iterators: a dropped one closes its response (and the engine stops).
                streams = [a.iter_raw(), b.iter_raw()]
                for stream in streams:
                    next(stream)
                shed = httpx.post(f"{url}/v1/chat/completions", json=SLOW)
                assert shed.status_code == 429
                error = shed.json()["error"]
                assert error["code"] == "server_busy" and error["type"] == "rate_limit_error"
                assert int(shed.headers["retry-after"]) >= 1
                assert "x-should-retry" not in shed.headers  # the SDK may retry a 429
                # Signatures, reports and health are never shed.
                assert client.get("/health").status_code == 200
            assert services.metrics.shed.labels("inflight")._value.get() == 1
        # Once they finish, completions are admitted again.
        assert httpx.post(f"{url}/v1/chat/completions", json={**SLOW, "stream": False}).status_code == 200


def test_slow_first_tokens_shed_new_work_and_recover() -> None:
    services = boot(ServerConfig.build(served_models=(MODEL,), max_ttft_s=0.1))
    with running(SigningMiddleware(FakeEngine(MODEL, token_delay_s=0.3), services=services)) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions", json={**SLOW, "max_tokens": 8}) as a:
                stream = a.iter_raw()
                next(stream)
                b = client.post("/v1/chat/completions", json=SLOW)
                assert b.status_code == 429, b.text
                assert b.json()["error"]["code"] == "server_busy"
            # Nothing in flight (once the server has seen the first stream go): admitted again.
            deadline = time.monotonic() + 5
            while services.admission.inflight and time.monotonic() < deadline:
                time.sleep(0.01)
            assert (
                client.post(
                    "/v1/chat/completions", json={**SLOW, "stream": False, "max_tokens": 1}
                ).status_code
                == 200
            )
    assert services.metrics.shed.labels("ttft")._value.get() == 1


def test_the_openai_sdk_honours_retry_after_on_a_shed() -> None:
    services = boot(ServerConfig.build(served_models=(MODEL,), max_inflight_completions=1))
    with running(SigningMiddleware(FakeEngine(MODEL, token_delay_s=0.05), services=services)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with (
            httpx.Client(base_url=url, timeout=20) as raw,
            raw.stream("POST", "/v1/chat/completions", json=SLOW) as a,
        ):
            stream = a.iter_raw()
            next(stream)
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        patient = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=3)
        assert patient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y"}]).id


def test_admission_unit_bounds() -> None:
    now = [0.0]
    control = AdmissionControl(max_inflight=3, max_ttft_s=1.0, clock=lambda: now[0])
    tickets = [control.admit() for _ in range(3)]
    assert all(t is None for t in tickets)
    assert control.admit() == "inflight"
    control.release()
    assert control.admit() is None
    control.release()
    control.release()
    for _ in range(5):
        control.observe_first_token(5.0)
    assert control.admit() == "ttft"
    assert control.retry_after_s() == 5
    control.release()
    assert control.inflight == 0
    assert control.admit() is None  # nothing in flight: always admitted, so the estimate can recover


def test_ttft_estimate_forgets_old_observations() -> None:
    now = [0.0]
    control = AdmissionControl(max_inflight=10, max_ttft_s=1.0, clock=lambda: now[0])
    control.admit()
    for _ in range(5):
        control.observe_first_token(5.0)
    control.admit()
    assert control.admit() == "ttft"
    now[0] += 120
    assert control.admit() is None


def test_retry_after_is_an_integer_of_seconds() -> None:
    control = AdmissionControl(max_inflight=1, max_ttft_s=None, clock=time.monotonic)
    assert control.retry_after_s() >= 1
