"""Signatures and usage shared between the processes of a node, nodes, and gateway replicas.

A key-value store below (``SharedKV``: put-if-absent with an expiry, get) and two stores on top:

    SharedSignatureStore   "tee-inference:sig:<completion id>"     -> the completion's signatures
    SharedUsageStore       "tee-inference:usage:<completion id>"   -> its signed usage
                           "tee-inference:usage-ref:<gateway ref>" -> the same, by the gateway's ref
    SharedReplayGuard      "tee-inference:e2ee-seen:<enc>"         -> an encrypted request answered

Two key-value stores implement it: Redis (``redis_kv.py``: across nodes and gateway replicas) and
the launcher's own store (``nodestore.py``: the vLLM API processes of one node, when there is no
Redis). Each process writes through its bounded in-memory store first, so it always answers for
what it signed itself even when the shared store is down; a miss there asks the shared store.

A shared store is outside this process and, for Redis, outside the CVM: anyone with access could
rewrite an entry. So a record read back is served only when it verifies itself: both signatures
over its own text, by a key the reader trusts (a node trusts its own attested key; the gateway,
the keys of the nodes it verified). A record that does not is counted, logged by kind, and answered
as absent (404): never served as valid. Deleting entries cannot be prevented, only noticed (404).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from tee_inference.signing import (
    CompletionSignature,
    CompletionSigner,
    checksum_address,
    ecdsa_signature_matches,
    ed25519_signature_matches,
)
from tee_inference.store import MemorySignatureStore, is_storable_id
from tee_inference.usage import SignedUsage, Usage, sign_usage

if TYPE_CHECKING:
    from tee_inference.config import ServerConfig

log = logging.getLogger("tee_inference.shared_store")

PREFIX: Final = "tee-inference:"
SIGNATURE_KEY, USAGE_KEY, USAGE_REF_KEY = PREFIX + "sig:", PREFIX + "usage:", PREFIX + "usage-ref:"
E2EE_SEEN_KEY: Final = PREFIX + "e2ee-seen:"


class SharedKV(Protocol):
    """Put-if-absent with an expiry, and get. Failures raise OSError (the store is unreachable)."""

    async def set_nx(self, key: str, value: bytes, ttl_s: float) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...


class TrustedKeys(Protocol):
    """Whether a record's signer is one this reader vouches for: its ecdsa address and ed25519 key."""

    def trusts(self, address: str, ed25519_public_key: bytes) -> bool: ...


class OwnKey:
    """A node trusts only its own attested key: it can vouch for nothing it did not sign."""

    def __init__(self, address: str, ed25519_public_key: bytes) -> None:
        self.address = address.lower()
        self.ed25519_public_key = ed25519_public_key

    def trusts(self, address: str, ed25519_public_key: bytes) -> bool:
        return address.lower() == self.address and ed25519_public_key == self.ed25519_public_key


def encode_signature(signature: CompletionSignature) -> bytes:
    return json.dumps(
        {
            "text": signature.text,
            "ecdsa": signature.ecdsa.hex(),
            "ed25519": signature.ed25519.hex(),
            "signing_address": signature.signing_address,
            "ed25519_public_key": signature.ed25519_public_key.hex(),
        },
        separators=(",", ":"),
    ).encode("ascii")


def decode_signature(data: bytes) -> CompletionSignature | None:
    try:
        record = json.loads(data)
        return CompletionSignature(
            text=str(record["text"]),
            ecdsa=bytes.fromhex(record["ecdsa"]),
            ed25519=bytes.fromhex(record["ed25519"]),
            signing_address=checksum_address(bytes.fromhex(record["signing_address"][2:])),
            ed25519_public_key=bytes.fromhex(record["ed25519_public_key"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def signature_verifies(signature: CompletionSignature, trusted: TrustedKeys) -> bool:
    """Both signatures cover the record's text, and its signer is one ``trusted`` vouches for."""
    return (
        trusted.trusts(signature.signing_address, signature.ed25519_public_key)
        and ecdsa_signature_matches(signature.text, signature.ecdsa, signature.signing_address)
        and ed25519_signature_matches(signature.text, signature.ed25519, signature.ed25519_public_key)
    )


def decode_usage(data: bytes) -> SignedUsage | None:
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return SignedUsage.from_record(record) if isinstance(record, dict) else None


def usage_verifies(usage: SignedUsage, trusted: TrustedKeys) -> bool:
    return trusted.trusts(usage.signing_address, usage.ed25519_public_key) and usage.verifies(
        usage.signing_address, usage.ed25519_public_key
    )


class SharedSignatureStore:
    """The process's memory store, written through to a shared one; misses read the shared one.

    ``put`` keeps put-if-absent: refused when this process or the shared store already holds the
    id. A shared store that cannot be reached costs the other replicas the record, never this
    process (it still answers from memory) and never the completion.
    """

    def __init__(
        self,
        local: MemorySignatureStore,
        kv: SharedKV,
        trusted: TrustedKeys,
        *,
        on_tampered: Callable[[str], None] | None = None,
    ) -> None:
        self.local = local
        self.kv = kv
        self.trusted = trusted
        self.ttl_s = local.ttl_s
        self._on_tampered = on_tampered

    def __len__(self) -> int:
        return len(self.local)

    async def put(self, completion_id: str, signature: CompletionSignature) -> bool:
        if not await self.local.put(completion_id, signature):
            return False
        try:
            key, data = SIGNATURE_KEY + completion_id, encode_signature(signature)
            return await self.kv.set_nx(key, data, self.ttl_s)
        except OSError as exc:
            log.warning("shared signature store unreachable on put: %s", type(exc).__name__)
            return True  # this process holds it; other replicas will answer 404

    async def get(self, completion_id: str) -> CompletionSignature | None:
        found = await self.local.get(completion_id)
        if found is not None or not is_storable_id(completion_id):
            return found
        try:
            data = await self.kv.get(SIGNATURE_KEY + completion_id)
        except OSError as exc:
            log.warning("shared signature store unreachable on get: %s", type(exc).__name__)
            return None
        if data is None:
            return None
        signature = decode_signature(data)
        if signature is None or not signature_verifies(signature, self.trusted):
            self._tampered("signature")
            return None
        return signature

    def _tampered(self, kind: str) -> None:
        log.warning("a shared %s record does not verify under a trusted key: not served", kind)
        if self._on_tampered is not None:
            self._on_tampered(kind)


class UsageStore(Protocol):
    """Usage by completion id, and by the gateway's ref (``X-Tee-Usage-Ref``); signed when served."""

    async def put(self, usage: Usage, ref: str | None) -> bool: ...

    async def get(self, completion_id: str) -> SignedUsage | None: ...

    async def get_by_ref(self, ref: str) -> SignedUsage | None: ...


class _UsageEntry:
    __slots__ = ("expires", "signed", "usage")

    def __init__(self, expires: float, usage: Usage, signed: SignedUsage | None) -> None:
        self.expires, self.usage, self.signed = expires, usage, signed


class MemoryUsageStore:
    """Bounded in-process usage records: expiry after ``ttl_s``, at most ``max_entries`` keys.

    A record is signed when it is first asked for, not when it is stored: most are never fetched
    from a node serving clients directly, and the two signatures are the costly part. Memory is
    this process's own, so what it signs later is what it stored. One expiry for all, so
    insertion order is expiry order (as in ``MemorySignatureStore``).
    """

    def __init__(
        self,
        signer: CompletionSigner,
        *,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.signer = signer
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._records: OrderedDict[str, _UsageEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    async def put(self, usage: Usage | SignedUsage, ref: str | None) -> bool:
        signed = usage if isinstance(usage, SignedUsage) else None
        plain = usage.usage if isinstance(usage, SignedUsage) else usage
        keys = [USAGE_KEY + plain.completion_id]
        if ref is not None and is_storable_id(ref):
            keys.append(USAGE_REF_KEY + ref)
        self._expire()
        if any(key in self._records for key in keys):
            return False  # first record wins, as for signatures
        entry = _UsageEntry(self._clock() + self.ttl_s, plain, signed)
        for key in keys:
            self._records[key] = entry  # one entry under both keys: signed once for both
        while len(self._records) > self.max_entries:
            self._records.popitem(last=False)
        return True

    async def get(self, completion_id: str) -> SignedUsage | None:
        return self._get(USAGE_KEY + completion_id)

    async def get_by_ref(self, ref: str) -> SignedUsage | None:
        return self._get(USAGE_REF_KEY + ref)

    def _get(self, key: str) -> SignedUsage | None:
        self._expire()
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry.signed is None:
            entry.signed = sign_usage(self.signer, entry.usage)
        return entry.signed

    def _expire(self) -> None:
        now = self._clock()
        while self._records and next(iter(self._records.values())).expires <= now:
            self._records.popitem(last=False)


class SharedUsageStore:
    """``MemoryUsageStore`` written through to a shared store, verified when read back.

    What goes to the shared store is signed at once: another process or replica can trust it
    only because it verifies.
    """

    def __init__(
        self,
        local: MemoryUsageStore,
        kv: SharedKV,
        trusted: TrustedKeys,
        *,
        on_tampered: Callable[[str], None] | None = None,
    ) -> None:
        self.local = local
        self.kv = kv
        self.trusted = trusted
        self._on_tampered = on_tampered

    async def put(self, usage: Usage, ref: str | None) -> bool:
        signed = sign_usage(self.local.signer, usage)
        if not await self.local.put(signed, ref):
            return False
        data = json.dumps(signed.to_record(), separators=(",", ":")).encode("ascii")
        keys = [USAGE_KEY + usage.completion_id]
        if ref is not None and is_storable_id(ref):
            keys.append(USAGE_REF_KEY + ref)
        try:
            stored = [await self.kv.set_nx(key, data, self.local.ttl_s) for key in keys]
        except OSError as exc:
            log.warning("shared usage store unreachable on put: %s", type(exc).__name__)
            return True
        return all(stored)

    async def get(self, completion_id: str) -> SignedUsage | None:
        return await self.local.get(completion_id) or await self._shared(USAGE_KEY, completion_id)

    async def get_by_ref(self, ref: str) -> SignedUsage | None:
        return await self.local.get_by_ref(ref) or await self._shared(USAGE_REF_KEY, ref)

    async def _shared(self, prefix: str, key: str) -> SignedUsage | None:
        if not is_storable_id(key):
            return None
        try:
            data = await self.kv.get(prefix + key)
        except OSError as exc:
            log.warning("shared usage store unreachable on get: %s", type(exc).__name__)
            return None
        if data is None:
            return None
        usage = decode_usage(data)
        # Under an id key it must be that id's usage: a valid record copied to another key is not.
        misplaced = usage is not None and prefix == USAGE_KEY and usage.usage.completion_id != key
        if usage is None or misplaced or not usage_verifies(usage, self.trusted):
            log.warning("a shared usage record does not verify under a trusted key: not served")
            if self._on_tampered is not None:
                self._on_tampered("usage")
            return None
        return usage


def node_kv(config: ServerConfig) -> SharedKV | None:
    """The key-value store this serving process shares: Redis, the launcher's store, or none."""
    if config.redis_url:
        from tee_inference.redis_kv import RedisKV

        return RedisKV(config.redis_url)
    if config.node_store:
        from tee_inference.nodestore import NodeStoreClient

        return NodeStoreClient(config.node_store)
    return None


def node_stores(
    config: ServerConfig,
    signer: CompletionSigner,
    local: MemorySignatureStore,
    kv: SharedKV | None,
    on_tampered: Callable[[str], None] | None = None,
) -> tuple[MemorySignatureStore | SharedSignatureStore, MemoryUsageStore | SharedUsageStore]:
    """A serving process's stores: in memory, written through to ``kv`` (``node_kv``) when given.

    Without it, memory alone (as before scale-out). A node trusts only its own key on reading.
    """
    usage = MemoryUsageStore(signer, ttl_s=config.signature_ttl_s, max_entries=config.signature_max_entries)
    if kv is None:
        return local, usage
    trusted = OwnKey(signer.ecdsa.address, signer.ed25519.public_key)
    return (
        SharedSignatureStore(local, kv, trusted, on_tampered=on_tampered),
        SharedUsageStore(usage, kv, trusted, on_tampered=on_tampered),
    )


class SharedReplayGuard:
    """The node-wide half of e2ee.ReplayGuard: an encapsulated key any process sharing ``kv`` answered.

    Each process checks its own memory first (e2ee.open_request), then this: put-if-absent of the
    request's encapsulated key (random per request, 32 bytes) with the guard's window as expiry.
    While the store is unreachable each process still refuses what it saw itself, and the request
    is served: a replay gains its sender nothing but the answer's size and timing (it is encrypted
    to the original client), so availability is kept rather than failing every encrypted request.
    """

    def __init__(self, kv: SharedKV, ttl_s: float) -> None:
        self.kv, self.ttl_s = kv, ttl_s
        self._warned = False

    async def first_use(self, enc: bytes) -> bool:
        try:
            first = await self.kv.set_nx(E2EE_SEEN_KEY + enc.hex(), b"1", self.ttl_s)
        except OSError as exc:
            if not self._warned:
                log.warning("shared replay check unavailable (%s): this process's own check only", exc)
                self._warned = True
            return True
        self._warned = False
        return first
