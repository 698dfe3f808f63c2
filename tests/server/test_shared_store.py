"""One store for every process of a node (the launcher's), and across nodes and replicas (Redis)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import redis

from support.redis_server import redis_server
from tee_inference.boot import boot, resume
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.middleware import SigningMiddleware
from tee_inference.nodestore import BoundedKV, NodeStoreClient, NodeStoreServer
from tee_inference.redis_kv import RedisKV
from tee_inference.services import Services
from tee_inference.shared_store import SIGNATURE_KEY, USAGE_KEY, encode_signature

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def _processes(count: int, **config: object) -> list[Services]:
    """``count`` serving processes of one boot: the first booted, the others resumed from it."""
    settings = ServerConfig.build(served_models=(MODEL,), **config)
    booted = boot(settings)
    assert booted.boot_state is not None
    return [booted, *(resume(settings, booted.boot_state) for _ in range(count - 1))]


async def _complete(services: Services) -> str:
    app = SigningMiddleware(FakeEngine(MODEL), services=services)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        return str(response.json()["id"])


async def _signature(services: Services, completion_id: str, algo: str = "ecdsa") -> httpx.Response:
    app = SigningMiddleware(FakeEngine(MODEL), services=services)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.get(f"/v1/signature/{completion_id}", params={"signing_algo": algo})


def test_every_process_of_a_node_answers_every_id_through_the_launchers_store() -> None:
    with NodeStoreServer(max_entries=100, max_bytes=1 << 20) as store:
        processes = _processes(3, node_store=store.name)

        async def scenario() -> None:
            ids = [await _complete(p) for p in processes]
            for completion_id in ids:
                for process in processes:
                    answer = await _signature(process, completion_id)
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["signing_address"] == processes[0].signer.ecdsa.address
                    assert answer.json()["usage"]["source"] == "engine"

        anyio.run(scenario)
        assert len(store.kv) == 6  # a signature and a usage record per completion


def test_node_store_client_reconnects_and_the_server_bounds_what_it_holds() -> None:
    kv = BoundedKV(max_entries=2, max_bytes=1 << 20)
    assert kv.set_nx("a", b"1", 60) and not kv.set_nx("a", b"2", 60)
    kv.set_nx("b", b"2", 60)
    kv.set_nx("c", b"3", 60)
    assert kv.get("a") is None and kv.get("c") == b"3"  # the oldest went first
    kv.set_nx("short", b"x", 0.01)
    time.sleep(0.02)
    assert kv.get("short") is None

    async def scenario() -> None:
        with NodeStoreServer(max_entries=10, max_bytes=1 << 16) as first:
            client = NodeStoreClient(first.name)
            assert await client.set_nx("k", b"v", 60)
            assert await client.get("k") == b"v"
            name = first.name
        with pytest.raises(OSError, match="node store unavailable"):
            await client.get("k")  # the launcher went away: a miss for the caller, not a crash
        assert NodeStoreClient(name + "-other") is not None

    anyio.run(scenario)


def test_any_node_answers_its_ids_from_redis_and_the_gateway_can_read_them(redis_url: str) -> None:
    first, second = _processes(2, redis_url=redis_url)

    async def scenario() -> None:
        completion_id = await _complete(first)
        answer = await _signature(second, completion_id, "ed25519")
        assert answer.status_code == 200
        assert answer.json()["signing_public_key"] == first.signer.ed25519.public_key.hex()
        # Another node (another key) reads the record but cannot vouch for it: 404, never served.
        stranger = _processes(1, redis_url=redis_url)[0]
        assert (await _signature(stranger, completion_id)).status_code == 404

    anyio.run(scenario)


def test_a_tampered_redis_entry_is_detected_and_never_served(redis_url: str) -> None:
    first, second = _processes(2, redis_url=redis_url)
    raw = redis.Redis.from_url(redis_url)

    async def scenario() -> tuple[str, str]:
        return await _complete(first), await _complete(first)

    victim, other = anyio.run(scenario)
    record = json.loads(raw.get(SIGNATURE_KEY + victim))
    # 1. The text rewritten (another response hash): the signatures no longer cover it.
    raw.set(SIGNATURE_KEY + victim, json.dumps({**record, "text": record["text"][:-4] + "0000"}))
    # 2. A record re-signed by an attacker's own key.
    attacker = _processes(1)[0].signer.sign("00" * 32, "11" * 32)
    raw.set(SIGNATURE_KEY + other, encode_signature(attacker))
    # 3. A valid usage record moved under another id.
    raw.set(USAGE_KEY + other, raw.get(USAGE_KEY + victim))

    async def check() -> None:
        for completion_id in (victim, other):
            assert (await _signature(second, completion_id)).status_code == 404
        assert await second.usage.get(other) is None
        # The process that signed still holds its own copy in memory and answers for it.
        assert (await _signature(first, victim)).json()["text"] == record["text"]

    anyio.run(check)
    tampered = second.metrics.shared_store_tampered
    assert tampered.labels("signature")._value.get() == 2 and tampered.labels("usage")._value.get() == 1


def test_redis_entries_expire_and_put_is_first_writer_wins(redis_url: str) -> None:
    async def scenario() -> None:
        kv = RedisKV(redis_url)
        key = f"tee-inference:test:{os.getpid()}:{time.monotonic_ns()}"
        assert await kv.set_nx(key, b"first", 0.2)
        assert not await kv.set_nx(key, b"second", 60)
        assert await kv.get(key) == b"first"
        await anyio.sleep(0.4)
        assert await kv.get(key) is None
        await kv.aclose()

    anyio.run(scenario)
    ttl = redis.Redis.from_url(redis_url)
    first = _processes(1, redis_url=redis_url, signature_ttl_s=1800)[0]
    completion_id = anyio.run(_complete, first)
    assert 1790 <= ttl.ttl(SIGNATURE_KEY + completion_id) <= 1800  # the retention time, set by the node


def test_a_redis_that_is_down_costs_replicas_the_record_never_the_completion(tmp_path: Path) -> None:
    first, second = _processes(2, redis_url=f"unix://{tmp_path}/nothing-here.sock")

    async def scenario() -> None:
        completion_id = await _complete(first)
        assert (await _signature(first, completion_id)).status_code == 200  # from its own memory
        assert (await _signature(second, completion_id)).status_code == 404

    anyio.run(scenario)


async def _post_sealed(services: Services, enc: str, body: bytes) -> httpx.Response:
    app = SigningMiddleware(FakeEngine(MODEL), services=services)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        headers = {"content-type": "application/json", "ehbp-encapsulated-key": enc}
        return await client.post("/v1/chat/completions", content=body, headers=headers)


def _replayed_across(processes: list[Services]) -> list[tuple[int, str | None]]:
    """One encrypted request sent to every process in turn, byte for byte: (status, error code)."""
    from tee_inference.e2ee import ClientExchange, public_bytes

    key = processes[0].keys.e2ee.public_key()
    assert all(public_bytes(p.keys.e2ee.public_key()) == public_bytes(key) for p in processes)
    exchange = ClientExchange(public_bytes(key))
    body = exchange.seal_body(json.dumps(CHAT).encode())

    async def scenario() -> list[tuple[int, str | None]]:
        out = []
        for process in [*processes, processes[0]]:
            answer = await _post_sealed(process, exchange.enc_header.decode(), body)
            code = answer.json()["error"]["code"] if answer.status_code != 200 else None
            out.append((answer.status_code, code))
        return out

    return anyio.run(scenario)


def test_an_encrypted_request_is_answered_once_by_the_whole_node() -> None:
    """A captured encrypted request replayed to another API process of the node: refused there too."""
    with NodeStoreServer(max_entries=100, max_bytes=1 << 20) as store:
        got = _replayed_across(_processes(2, node_store=store.name))
    assert got == [(200, None), (409, "e2ee_replay"), (409, "e2ee_replay")]


def test_and_by_every_replica_sharing_redis(redis_url: str) -> None:
    got = _replayed_across(_processes(2, redis_url=redis_url))
    assert got == [(200, None), (409, "e2ee_replay"), (409, "e2ee_replay")]


def test_with_the_shared_store_down_each_process_still_refuses_its_own(tmp_path: Path) -> None:
    got = _replayed_across(_processes(2, redis_url=f"unix://{tmp_path}/nothing-here.sock"))
    # The second process cannot know, and serves it (encrypted to the original client: the replayer
    # learns its size); the first still refuses what it answered itself.
    assert got == [(200, None), (200, None), (409, "e2ee_replay")]
