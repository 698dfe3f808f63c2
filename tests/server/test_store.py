"""The bounded signature store: retention, count and byte bounds, replacement."""

from __future__ import annotations

import anyio
import pytest

from tee_inference.signing import CompletionSignature
from tee_inference.store import MemorySignatureStore, record_size


def _sig(n: int) -> CompletionSignature:
    return CompletionSignature(
        text=f"{n:064x}:{n:064x}", ecdsa=b"e" * 65, ed25519=b"d" * 64,
        signing_address="0x" + "ab" * 20, ed25519_public_key=b"k" * 32,
    )  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):  # type: ignore[no-untyped-def]
    return anyio.run(lambda: coro)


def test_signatures_are_kept_for_the_ttl_then_expire() -> None:
    async def scenario() -> None:
        clock = Clock()
        evicted: list[str] = []
        store = MemorySignatureStore(
            ttl_s=1800, max_entries=10, max_bytes=1 << 20, clock=clock, on_evict=evicted.append
        )
        await store.put("chatcmpl-a", _sig(1))
        clock.now += 1799
        assert await store.get("chatcmpl-a") == _sig(1)
        clock.now += 1
        assert await store.get("chatcmpl-a") is None
        assert evicted == ["expired"] and len(store) == 0 and store.bytes_used == 0

    anyio.run(scenario)


def test_count_bound_evicts_oldest_first() -> None:
    async def scenario() -> None:
        store = MemorySignatureStore(ttl_s=1800, max_entries=3, max_bytes=1 << 20)
        for n in range(5):
            await store.put(f"id-{n}", _sig(n))
        assert len(store) == 3
        assert [await store.get(f"id-{n}") is None for n in range(5)] == [True, True, False, False, False]

    anyio.run(scenario)


def test_byte_bound_holds() -> None:
    async def scenario() -> None:
        one = record_size("id-0", _sig(0))
        store = MemorySignatureStore(ttl_s=1800, max_entries=1000, max_bytes=one * 4 + 10)
        for n in range(100):
            await store.put(f"id-{n}", _sig(n))
            assert store.bytes_used <= store.max_bytes
        assert len(store) == 4
        assert await store.get("id-99") is not None

    anyio.run(scenario)


def test_a_held_id_is_never_replaced_and_costs_nothing_more() -> None:
    async def scenario() -> None:
        store = MemorySignatureStore(ttl_s=1800, max_entries=10, max_bytes=1 << 20)
        for n in range(50):
            await store.put("same", _sig(n))
        assert len(store) == 1 and store.bytes_used == record_size("same", _sig(0))
        assert await store.get("same") == _sig(0)

    anyio.run(scenario)


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemorySignatureStore(ttl_s=0, max_entries=1, max_bytes=1)
