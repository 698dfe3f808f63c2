"""Where completion signatures wait to be fetched by id.

The interface is async so that a shared store (Redis, for several replicas behind one
gateway) can implement it without changing the middleware.

Nobody can replace, evict or hide another client's signature through its id: ids are the
engine's own random ones (the middleware keeps clients from choosing them), `put` never
replaces a record (put-if-absent: a second record under a held id is refused and reported),
and only ids the signature route can fetch are stored, each counted in the byte budget.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from tee_inference.signing import CompletionSignature

# What one record costs beyond its strings: the OrderedDict slot, the dataclass and the
# bytes objects. Measured with tracemalloc on CPython 3.11 and rounded up, so the byte
# bound stays a bound.
_RECORD_OVERHEAD_BYTES = 480

# What `GET /v1/signature/{id}` accepts, and so what is worth storing. vLLM's ids
# (`chatcmpl-` or `cmpl-` and 16 to 32 hex digits, `_n` suffixes for n > 1) fit easily.
COMPLETION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,255}")


def is_storable_id(completion_id: str) -> bool:
    return COMPLETION_ID.fullmatch(completion_id) is not None


class SignatureStore(Protocol):
    async def put(self, completion_id: str, signature: CompletionSignature) -> bool:
        """Store unless the id is held or unfetchable; False when nothing was stored."""
        ...

    async def get(self, completion_id: str) -> CompletionSignature | None: ...


def record_size(completion_id: str, signature: CompletionSignature) -> int:
    return (
        _RECORD_OVERHEAD_BYTES
        + len(completion_id)
        + len(signature.text)
        + len(signature.ecdsa)
        + len(signature.ed25519)
        + len(signature.signing_address)
        + len(signature.ed25519_public_key)
    )


class MemorySignatureStore:
    """Bounded in-process store: expiry after `ttl_s`, at most `max_entries` and `max_bytes`.

    Every record lives for the same time, so insertion order is expiry order and the oldest
    record is always at the front: put, get and eviction are all O(1) (amortised).
    """

    def __init__(
        self,
        *,
        ttl_s: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str], None] | None = None,
        on_collision: Callable[[str], None] | None = None,
    ) -> None:
        if ttl_s <= 0 or max_entries <= 0 or max_bytes <= 0:
            raise ValueError("signature store bounds must be positive")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._on_evict = on_evict
        self._on_collision = on_collision
        self._records: OrderedDict[str, tuple[float, int, CompletionSignature]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    async def put(self, completion_id: str, signature: CompletionSignature) -> bool:
        if not is_storable_id(completion_id):
            return False
        now = self._clock()
        self._expire(now)
        if completion_id in self._records:
            # Never last-writer-wins: the first record under an id is the one its client saw.
            if self._on_collision is not None:
                self._on_collision(completion_id)
            return False
        size = record_size(completion_id, signature)
        self._records[completion_id] = (now + self.ttl_s, size, signature)
        self._bytes += size
        while len(self._records) > self.max_entries or self._bytes > self.max_bytes:
            self._drop_oldest("capacity")
        return True

    async def get(self, completion_id: str) -> CompletionSignature | None:
        now = self._clock()
        self._expire(now)
        entry = self._records.get(completion_id)
        if entry is None:
            return None
        return entry[2]

    def _expire(self, now: float) -> None:
        while self._records:
            expires, _, _ = next(iter(self._records.values()))
            if expires > now:
                return
            self._drop_oldest("expired")

    def _drop_oldest(self, reason: str) -> None:
        _, (_, size, _) = self._records.popitem(last=False)
        self._bytes -= size
        if self._on_evict is not None:
            self._on_evict(reason)
