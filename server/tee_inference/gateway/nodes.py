"""The gateway's nodes: each verified with the verifier library before it gets a request.

    pending ──verify (fresh nonce)──▶ verified ──probe: key changed / TLS pin fails──▶ pending
       ▲            │ fails                 │ every reverify_s: verify again
       └── retry_s ─┘ failed                ▼

A node is *verified* when a report for a nonce the gateway just chose passes the gateway's policy
(quote and its chain, GPU evidence for the same nonce, expected measurements, the key report_data
binds, and over https the TLS key of the live connection, which is then pinned for every later
connection). Only verified nodes are routed to. Each node is probed every ``probe_s`` (its cached
report names its key; over https, the pinned handshake itself fails on a new key): a node that comes
back with another key is taken out at once and verified again before it gets traffic. A node whose
GPU is already held by another verified node is refused (two nodes cannot share a device).

Keys verified within the signature retention are remembered, so that signatures a node made before
it restarted can still be vouched for (``TrustedKeys`` for the shared store).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.to_thread
import httpx

from tee_inference.gateway.config import GatewayConfig
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.results import VerificationResult
from tee_inference.verify.tlspin import PinMismatchError, SpkiPin
from tee_inference.verify.verifier import Verifier

log = logging.getLogger("tee_inference.gateway.nodes")

State = Literal["pending", "verified", "failed"]


@dataclass(frozen=True)
class NodeIdentity:
    """What verification established about a node; only these keys are ever trusted for it."""

    address: str
    ed25519_public_key: bytes
    e2ee_public_key: bytes | None
    tls_spki_sha256: bytes | None
    models: frozenset[str]
    devices: tuple[tuple[str, str | None], ...]  # (ueid, identity key sha256) per GPU
    simulated: bool
    verified_at: float


@dataclass(eq=False)
class Node:
    url: str
    client: httpx.AsyncClient
    pin: SpkiPin | None
    state: State = "pending"
    identity: NodeIdentity | None = None
    problem: str = "not verified yet"
    outstanding: int = 0
    wake: anyio.Event = field(default_factory=anyio.Event)

    @property
    def secure(self) -> bool:
        return self.pin is not None

    @property
    def verified(self) -> bool:
        return self.state == "verified" and self.identity is not None


class NodePool:
    def __init__(
        self,
        config: GatewayConfig,
        verifier: Verifier,
        policy: VerificationPolicy,
        *,
        node_headers: dict[str, str],
        clock: Any = time.monotonic,
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.policy = policy
        self.headers = node_headers
        self._clock = clock
        self.nodes: list[Node] = []
        for url in config.nodes:
            pin = SpkiPin() if url.lower().startswith("https://") else None
            client = httpx.AsyncClient(
                base_url=url,
                headers=node_headers,
                verify=pin.context if pin else True,
                timeout=httpx.Timeout(connect=config.node_timeout_s, read=None, write=60.0, pool=30.0),
                limits=httpx.Limits(max_connections=1024, max_keepalive_connections=64),
            )
            self.nodes.append(Node(url, client, pin))
        # address (lowercase) -> (ed25519 key, node url, verified until): keys vouched for, past ones too.
        self._keys: dict[str, tuple[bytes, str, float]] = {}
        self.verifications: dict[str, int] = {"ok": 0, "failed": 0}
        self._turn = 0

    # -- routing ---------------------------------------------------------------------------

    def verified(self, model: str | None = None) -> list[Node]:
        return [
            n
            for n in self.nodes
            if n.verified and (model is None or model in n.identity.models)  # type: ignore[union-attr]
        ]

    def by_address(self, address: str) -> Node | None:
        wanted = address.lower()
        return next((n for n in self.verified() if n.identity and n.identity.address.lower() == wanted), None)

    def choose(self, model: str, affinity: str | None, exclude: Sequence[Node] = ()) -> Node | None:
        """The least busy verified node serving ``model``; with an affinity key (``--sticky``), the
        key's own node (rendezvous hashing) while it is within ``sticky_slack`` of the least busy."""
        candidates = [n for n in self.verified(model) if n not in exclude]
        if not candidates:
            return None
        fewest = min(n.outstanding for n in candidates)
        idle = [n for n in candidates if n.outstanding == fewest]
        self._turn += 1
        least = idle[self._turn % len(idle)]  # ties in turn, so that sequential traffic spreads too
        if affinity is None or not self.config.sticky:
            return least

        def weight(node: Node) -> bytes:
            return hashlib.sha256(f"{affinity}\0{node.url}".encode()).digest()

        home = max(candidates, key=weight)
        return home if home.outstanding <= least.outstanding + self.config.sticky_slack else least

    def models(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for node in self.verified():
            assert node.identity is not None
            for model in node.identity.models:
                out.setdefault(model, []).append(node)
        return out

    # -- trust -----------------------------------------------------------------------------

    def trusts(self, address: str, ed25519_public_key: bytes) -> bool:
        """``shared_store.TrustedKeys``: a key some node was verified with within the retention."""
        entry = self._keys.get(address.lower())
        return entry is not None and entry[0] == ed25519_public_key and entry[2] > self._clock()

    def node_of_key(self, address: str) -> str | None:
        entry = self._keys.get(address.lower())
        return entry[1] if entry is not None else None

    def suspect(self, node: Node, reason: str) -> None:
        """Take a node out of routing now (its key or TLS key changed) and verify it again."""
        if node.state == "verified":
            log.warning("node %s taken out of routing: %s", node.url, reason)
        node.state, node.problem = "pending", reason
        node.wake.set()

    # -- verification ----------------------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as tasks:
            for node in self.nodes:
                tasks.start_soon(self._watch, node)

    async def aclose(self) -> None:
        for node in self.nodes:
            await node.client.aclose()

    async def _watch(self, node: Node) -> None:
        next_verify = 0.0
        while True:
            if node.state != "verified" or self._clock() >= next_verify:
                ok = await self.verify(node)
                next_verify = self._clock() + (self.config.reverify_s if ok else 0.0)
                wait = self.config.probe_s if ok else self.config.retry_s
            else:
                await self.probe(node)
                wait = self.config.probe_s
            node.wake = anyio.Event()
            with anyio.move_on_after(wait):
                await node.wake.wait()

    async def verify(self, node: Node) -> bool:
        """One full verification with a fresh nonce; routes to the node only if it passes."""
        nonce = os.urandom(32)
        probe = SpkiPin() if node.secure else None
        params = {"nonce": nonce.hex(), "signing_algo": "ecdsa"}
        if node.secure:
            params["include_tls_fingerprint"] = "true"
        try:
            # The report comes over a connection of its own, unpinned: it says which key to pin.
            async with httpx.AsyncClient(
                base_url=node.url,
                headers=self.headers,
                timeout=self.config.node_timeout_s * 3,
                verify=probe.context if probe is not None else True,
            ) as client:
                response = await client.get("/v1/attestation/report", params=params)
            if response.status_code != 200:
                return self._reject(node, f"report request answered HTTP {response.status_code}")
            body = response.content
        except httpx.HTTPError as exc:
            return self._reject(node, f"report request failed: {type(exc).__name__}")
        result = await anyio.to_thread.run_sync(self._judge, body, nonce, node.secure)
        if not result.ok:
            blocking = result.blocking[0]
            return self._reject(node, f"{blocking.name}: {blocking.detail}")
        identity, problem = self._identity(result, probe)
        if identity is None:
            return self._reject(node, problem)
        shared = self._shared_device(node, identity)
        if shared is not None:
            return self._reject(node, f"gpu_distinct: a GPU of this node is already held by {shared}")
        if node.pin is not None and identity.tls_spki_sha256 is not None:
            node.pin.pin(identity.tls_spki_sha256)  # every later connection must present this key
        if node.identity is None or node.identity.address != identity.address:
            log.info(
                "node %s verified: signing address %s, models %s",
                node.url,
                identity.address,
                ",".join(sorted(identity.models)),
            )
        node.identity, node.state, node.problem = identity, "verified", ""
        until = self._clock() + self.config.signature_ttl_s + self.config.reverify_s
        self._keys[identity.address.lower()] = (identity.ed25519_public_key, node.url, until)
        self.verifications["ok"] += 1
        return True

    def _judge(self, body: bytes, nonce: bytes, secure: bool) -> VerificationResult:
        return self.verifier.verify_report(
            body,
            self.policy,
            nonce=nonce,
            signing_algo="ecdsa",
            tls_layout=True if secure else None,
            pccs_url=self.config.pccs_url,
        )

    def _identity(self, result: VerificationResult, probe: SpkiPin | None) -> tuple[NodeIdentity | None, str]:
        facts = result.attested
        address, ed25519 = facts.get("signing_address"), facts.get("ed25519_public_key")
        if not isinstance(address, str) or not isinstance(ed25519, str):
            return None, "the report binds no signing key (or its keyset event names no ed25519 key)"
        spki = None
        if probe is not None:
            attested, live = facts.get("tls_cert_fingerprint"), probe.last_seen
            if not isinstance(attested, str) or live is None or live.hex() != attested:
                seen = live.hex() if live else None
                return (
                    None,
                    f"tls_binding: the connection presented SPKI {seen}, the attested key is {attested}",
                )
            spki = live
        e2ee = facts.get("e2ee_public_key")
        models = frozenset(m for m in str(facts.get("model") or "").split(",") if m)
        devices = tuple(
            (str(d.get("ueid")), d.get("identity_key_sha256")) for d in facts.get("gpu_devices", [])
        )
        return NodeIdentity(
            address=address,
            ed25519_public_key=bytes.fromhex(ed25519),
            e2ee_public_key=bytes.fromhex(e2ee) if isinstance(e2ee, str) else None,
            tls_spki_sha256=spki,
            models=models,
            devices=devices,
            simulated=result.simulated,
            verified_at=time.time(),
        ), ""

    def _shared_device(self, node: Node, identity: NodeIdentity) -> str | None:
        for other in self.verified():
            if other is node or other.identity is None:
                continue
            for ueid, key in identity.devices:
                for other_ueid, other_key in other.identity.devices:
                    if ueid == other_ueid or (key is not None and key == other_key):
                        return other.url
        return None

    def _reject(self, node: Node, problem: str) -> bool:
        if node.state == "verified" or node.problem != problem:
            log.warning("node %s not verified: %s", node.url, problem)
        node.state, node.problem = "failed", problem
        self.verifications["failed"] += 1
        return False

    async def probe(self, node: Node) -> None:
        """A cheap identity check between verifications: the node's cached report names its key."""
        try:
            response = await node.client.get("/v1/attestation/report", timeout=self.config.node_timeout_s)
        except httpx.HTTPError as exc:
            if pin_failed(exc):
                self.suspect(node, "its TLS key changed (the pinned handshake failed)")
            else:
                self.suspect(node, f"unreachable ({type(exc).__name__})")
            return
        if response.status_code != 200:
            self.suspect(node, f"its report answered HTTP {response.status_code}")
            return
        try:
            address = response.json().get("signing_address")
        except (ValueError, AttributeError):
            address = None
        if node.identity is not None and address != node.identity.address:
            self.suspect(node, f"it now signs as {address}, not {node.identity.address}")


def pin_failed(exc: BaseException) -> bool:
    """A connection refused at the handshake because the peer's TLS key is not the pinned one."""
    return isinstance(exc.__context__, PinMismatchError) or "attested" in str(exc)
