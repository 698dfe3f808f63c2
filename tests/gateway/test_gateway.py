"""The gateway on loopback: a real Redis, simulated nodes, only verified nodes ever get a request."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import redis

from support.nodes import (
    MODEL,
    NonceSwapper,
    RunningNode,
    chat,
    expected_file,
    gateway,
    gateway_config,
    node,
    wait_until,
)
from support.redis_server import redis_server
from tee_inference.client import AttestedClient
from tee_inference.shared_store import SIGNATURE_KEY
from tee_inference.verify.usage import verify_usage


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def three(redis_url: str) -> Iterator[list[RunningNode]]:
    with node(redis_url=redis_url) as a, node(redis_url=redis_url) as b, node(redis_url=redis_url) as c:
        yield [a, b, c]


def _id(response: httpx.Response) -> str:
    if response.headers["content-type"].startswith("text/event-stream"):
        line = next(x for x in response.text.split("\n") if x.startswith("data: {"))
        return str(json.loads(line[6:])["id"])
    return str(response.json()["id"])


def test_traffic_spreads_over_the_verified_nodes(three: list[RunningNode], tmp_path: Path) -> None:
    before = [len(n.watched.completions) for n in three]
    with gateway(gateway_config([n.url for n in three], tmp_path)) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(9):
                assert chat(client, f"sequential {i}").status_code == 200
        with ThreadPoolExecutor(8) as pool:

            def one(i: int) -> int:
                with httpx.Client(base_url=url, timeout=30) as client:
                    return chat(client, f"concurrent {i}", stream=True).status_code

            assert set(pool.map(one, range(12))) == {200}
    got = [len(n.watched.completions) - b for n, b in zip(three, before, strict=True)]
    assert sum(got) == 21 and min(got) >= 3, got


def test_nodes_that_fail_attestation_never_receive_a_request(
    three: list[RunningNode], tmp_path: Path
) -> None:
    with (
        node(model_weights_root="ab" * 32) as wrong_measurement,
        node(wrap=NonceSwapper) as wrong_nonce,
    ):
        bad = [wrong_measurement, wrong_nonce]
        config = gateway_config([three[0].url, *(n.url for n in bad)], tmp_path)
        with gateway(config, wait_for=1) as (url, app):
            wait_until(lambda: all(n.state == "failed" for n in app.pool.nodes[1:]))
            problems = {n.url: n.problem for n in app.pool.nodes}
            assert "measurements" in problems[wrong_measurement.url]
            assert problems[wrong_nonce.url].startswith(("report_data", "gpu_nonce")), problems
            with httpx.Client(base_url=url, timeout=30) as client:
                for i in range(6):
                    assert chat(client, f"only the good one {i}").status_code == 200
        assert all(n.watched.completions == [] for n in bad)
    # Simulated nodes without --allow-simulated: none verifies, and nothing reaches any of them.
    before = sum(len(n.watched.completions) for n in three)
    config = gateway_config([n.url for n in three], tmp_path, allow_simulated=False)
    with gateway(config, wait_for=0) as (url, app):
        wait_until(lambda: all(n.state == "failed" for n in app.pool.nodes))
        assert all("--allow-simulated" in n.problem for n in app.pool.nodes)
        with httpx.Client(base_url=url, timeout=30) as client:
            refused = chat(client)
            assert refused.status_code == 400
            assert refused.json()["error"]["code"] == "model_not_confidential"
            assert client.get("/health").status_code == 503
    assert sum(len(n.watched.completions) for n in three) == before


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_node_back_with_a_new_key_is_verified_again_before_traffic(tmp_path: Path, tls: bool) -> None:
    with node(tls=tls) as steady, ExitStack() as stack:
        first = stack.enter_context(node(tls=tls))
        config = gateway_config([steady.url, first.url], tmp_path, allow_plaintext=not tls)
        with gateway(config) as (url, app), httpx.Client(base_url=url, timeout=30) as client:
            target = app.pool.nodes[1]
            assert target.identity is not None and target.identity.address == first.address
            stack.close()  # the node goes away ...
            if not tls:
                # Over plain http nothing stops a request reaching a restarted node before a probe
                # notices it (docs/gateway.md): wait for the gateway to notice the outage first.
                wait_until(lambda: target.state != "verified")
            with node(port=first.port, tls=tls) as again:  # ... and comes back with a new key
                assert again.address != first.address
                # Traffic all along: none of it may reach the new key before the gateway verified it.
                deadline = time.monotonic() + 15
                while not (target.verified and target.identity and target.identity.address == again.address):
                    assert chat(client, "during the restart").status_code == 200
                    assert time.monotonic() < deadline, (target.state, target.problem)
                for i in range(6):
                    assert chat(client, f"after {i}").status_code == 200
                kinds = [(kind, t) for kind, t, _ in again.watched.events]
                first_completion = min(t for kind, t in kinds if kind == "completion")
                first_report = min(t for kind, t in kinds if kind == "report")
                assert first_report < first_completion


def test_verify_url_against_the_gateway_verifies_each_node(three: list[RunningNode], tmp_path: Path) -> None:
    with gateway(gateway_config([n.url for n in three], tmp_path)) as (url, _):
        result = subprocess.run(
            [sys.executable, "-m", "tee_inference", "verify", "url", url, "--model", MODEL, "--allow-simulated",
             "--allow-plaintext", "--expect", str(expected_file(tmp_path)), "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    verdict = json.loads(result.stdout)
    assert result.returncode == 0, [c for c in verdict["checks"] if c["status"] != "pass"]
    checks = {c["name"]: c for c in verdict["checks"]}
    assert "2 other node(s)" in checks["all_attestations"]["detail"]
    assert checks["signature"]["status"] == "pass"
    addresses = {n["signing_address"] for n in verdict["attested"]["nodes"]}
    assert addresses == {n.address for n in three}


def test_signatures_and_signed_usage_from_any_replica(
    three: list[RunningNode], redis_url: str, tmp_path: Path
) -> None:
    with (
        gateway(gateway_config([n.url for n in three], tmp_path, redis_url=redis_url)) as (one, _),
        gateway(gateway_config([n.url for n in three], tmp_path, redis_url=redis_url)) as (two, app_two),
        gateway(gateway_config([n.url for n in three], tmp_path)) as (fanout, _),
    ):
        with httpx.Client(base_url=one, timeout=30) as client:
            response = chat(client, "which node?", stream=True)
        served_by = response.headers["x-tee-node"]
        completion_id = _id(response)
        text = f"{hashlib.sha256(response.request.content).hexdigest()}:{hashlib.sha256(response.content).hexdigest()}"
        for replica in (two, fanout):
            for algo in ("ecdsa", "ed25519"):
                answer = httpx.get(f"{replica}/v1/signature/{completion_id}", params={"signing_algo": algo})
                assert answer.status_code == 200, answer.text
                record = answer.json()
                assert record["text"] == text and record["signing_address"] == served_by
                assert record["node"] in {n.url for n in three}
                key = next(n for n in three if n.address == served_by).services.signer
                usage, checks = verify_usage(
                    record, completion_id=completion_id,
                    **({"address": served_by} if algo == "ecdsa" else {"public_key": key.ed25519.public_key.hex()}),
                )  # fmt: skip
                assert usage is not None and usage.source == "engine", checks
        # A tampered shared entry is never served: the replica falls back to asking the nodes,
        # which answer from their own memory, verified under the key the gateway verified.
        raw = redis.Redis.from_url(redis_url)
        record = json.loads(raw.get(SIGNATURE_KEY + completion_id))
        raw.set(SIGNATURE_KEY + completion_id, json.dumps({**record, "text": "0" * 64 + ":" + "0" * 64}))
        answer = httpx.get(f"{two}/v1/signature/{completion_id}").json()
        assert answer["text"] == text
        assert app_two.metrics.tampered._value.get() == 1
        assert httpx.get(f"{two}/v1/signature/chatcmpl-nobody").status_code == 404


def test_usage_is_written_to_the_outbox_and_reported_with_the_nodes_signature(
    three: list[RunningNode], tmp_path: Path
) -> None:
    log = tmp_path / "usage.jsonl"
    config = gateway_config([n.url for n in three], tmp_path, usage_log=log)
    with gateway(config) as (url, app), httpx.Client(base_url=url, timeout=30) as client:
        streamed = chat(client, "count me", stream=True)
        whole = chat(client, "count me too")
        wait_until(lambda: app.outbox.count("reported") == 2)  # appended to the log, then marked
    records = {json.loads(line)["usage"]["id"]: json.loads(line) for line in log.read_text().splitlines()}
    for response in (streamed, whole):
        record = records[_id(response)]
        assert record["signing_address"] == response.headers["x-tee-node"]
        usage, checks = verify_usage(record["usage"], address=record["signing_address"])
        assert usage is not None and usage.source == "engine", checks
        assert record["stream"] is (response is streamed)


def test_rate_limits_per_key_shared_by_replicas(
    three: list[RunningNode], redis_url: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"name": "alice", "sha256": hashlib.sha256(b"alice-token").hexdigest(), "requests_per_minute": 3},
        {"name": "bob", "sha256": hashlib.sha256(b"bob-token").hexdigest()},
    ]}))  # fmt: skip
    config = dict(redis_url=redis_url, keys_file=keys)
    urls = [n.url for n in three]
    with (
        gateway(gateway_config(urls, tmp_path, **config)) as (one, _),
        gateway(gateway_config(urls, tmp_path, **config)) as (two, _),
    ):
        alice = {"authorization": "Bearer alice-token"}
        while time.time() % 60 > 55:  # the four requests fall in one fixed one-minute window
            time.sleep(0.1)
        answers = []
        for replica in (one, two, one, two):
            with httpx.Client(base_url=replica, timeout=30, headers=alice) as client:
                answers.append(chat(client, "limited"))
        assert [a.status_code for a in answers[:3]] == [200, 200, 200]
        limited = answers[3]
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert limited.headers["x-ratelimit-limit"] == "3" and limited.headers["x-ratelimit-remaining"] == "0"
        assert int(limited.headers["retry-after"]) >= 1
        assert answers[0].headers["x-ratelimit-remaining"] == "2"
        with httpx.Client(base_url=one, timeout=30, headers={"authorization": "Bearer bob-token"}) as client:
            assert chat(client).status_code == 200  # another key, its own budget
        with httpx.Client(base_url=one, timeout=30, headers={"authorization": "Bearer nobody"}) as client:
            assert chat(client).status_code == 401
    # The node saw the caller's tenant (for its cache salt); a client cannot name one itself.
    seen = [h for n in three for h in n.watched.completions if h.get(b"x-tee-tenant")]
    assert {h[b"x-tee-tenant"] for h in seen[-4:]} <= {b"alice", b"bob"}


def test_refusals_never_reach_a_node(three: list[RunningNode], tmp_path: Path) -> None:
    before = sum(len(n.watched.completions) for n in three)
    with gateway(gateway_config([n.url for n in three], tmp_path)) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            unknown = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": []})
            assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "model_not_confidential"
            for path in ("/v1/embeddings", "/v1/images/generations", "/v1/audio/speech"):
                refused = client.post(path, json={"model": MODEL})
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_available"
            assert client.get("/v1/nothing").status_code == 404
            assert client.get("/v1/chat/completions").status_code == 405
            # A client cannot name a tenant (another's cache partition): the header is dropped.
            body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            assert client.post(
                "/v1/chat/completions", json=body, headers={"x-tee-tenant": "victim"}
            ).is_success
            models = client.get("/v1/models").json()["data"]
            assert [m["id"] for m in models] == [MODEL] and models[0]["confidential_compute"] is True
    assert sum(len(n.watched.completions) for n in three) == before + 1  # the one well-formed chat
    _, _, last = max((e for n in three for e in n.watched.events if e[0] == "completion"), key=lambda e: e[1])
    assert b"x-tee-tenant" not in last


def test_encrypted_bodies_through_the_gateway(three: list[RunningNode], tmp_path: Path) -> None:
    with gateway(gateway_config([n.url for n in three], tmp_path)) as (url, _):
        with AttestedClient(url, model=MODEL, expect=expected_file(tmp_path), allow_simulated=True,
                            allow_plaintext=True, encrypt=True, gateway=True, timeout=30) as client:  # fmt: skip
            served = set()
            for i in range(6):
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"secret {i}"}],
                        "max_tokens": 5, "stream": i % 2 == 0}  # fmt: skip
                response = client.post(f"{url}/v1/chat/completions", json=body)
                assert response.status_code == 200
                response.read()  # the signature over the ciphertext both ways is checked here
                served.add(response.headers["x-tee-node"])
            assert len(served) >= 2
        # Sealed to one node's key, it cannot go anywhere else: without naming the node, refused.
        sealed = httpx.post(f"{url}/v1/chat/completions", content=b"\x00" * 40,
                            headers={"content-type": "application/json", "ehbp-encapsulated-key": "00" * 32,
                                     "x-tee-model": MODEL})  # fmt: skip
        assert sealed.status_code == 400 and sealed.json()["error"]["code"] == "node_required"
