"""What the gateway answers about its nodes: their reports for a caller's nonce, their signatures.

Neither is the gateway's own claim. A report is the node's own, fetched for the caller's nonce and
verified again here as the node the gateway routes to (the caller verifies it once more). A
signature is served from the shared store only if it verifies under a key the gateway verified,
else asked of every verified node and checked under that node's key; a usage record travels with
it only if its own signature checks too.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.to_thread
import httpx

from tee_inference.gateway.config import GatewayConfig
from tee_inference.gateway.metrics import GatewayMetrics
from tee_inference.gateway.nodes import Node, NodePool
from tee_inference.redis_kv import RedisKV
from tee_inference.shared_store import (
    SIGNATURE_KEY,
    USAGE_KEY,
    decode_signature,
    decode_usage,
    signature_verifies,
    usage_verifies,
)
from tee_inference.signing import ecdsa_signature_matches, ed25519_signature_matches
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.usage import verify_usage

SIGNATURE_PREFIX = "/v1/signature/"


class NodeAnswers:
    def __init__(
        self,
        config: GatewayConfig,
        pool: NodePool,
        policy: VerificationPolicy,
        redis: RedisKV | None,
        metrics: GatewayMetrics,
    ) -> None:
        self.config, self.pool, self.policy, self.redis, self.metrics = config, pool, policy, redis, metrics

    async def report_of(self, node: Node, nonce: bytes, algo: str, tls: bool) -> dict[str, Any] | None:
        """This node's report for the caller's nonce, if it still verifies as the node we route to."""
        params = {"nonce": nonce.hex(), "signing_algo": algo, "include_tls_fingerprint": str(tls).lower()}
        try:
            response = await node.client.get(
                "/v1/attestation/report", params=params, timeout=self.config.node_timeout_s * 3
            )
            report = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            report = None
        if not isinstance(report, dict):
            self.pool.suspect(node, "it did not answer a report")
            return None
        result = await anyio.to_thread.run_sync(
            lambda: self.pool.verifier.verify_report(
                report,
                self.policy,
                nonce=nonce,
                signing_algo=algo,
                tls_layout=True if tls else None,
                pccs_url=self.config.pccs_url,
            )
        )
        identity = node.identity
        field = "signing_address" if algo == "ecdsa" else "signing_public_key"
        expected = (
            None
            if identity is None
            else (identity.address if algo == "ecdsa" else identity.ed25519_public_key.hex())
        )
        if not result.ok or result.attested.get(field) != expected:
            self.pool.suspect(node, "its report for a caller's nonce did not verify as the verified node")
            return None
        report.pop("all_attestations", None)
        return report

    async def signature(self, completion_id: str, algo: str) -> dict[str, Any] | None:
        """A completion's signature from any node: the shared store, else asking every node."""
        return await self._stored_signature(completion_id, algo) or await self._asked_signature(
            completion_id, algo
        )

    async def _stored_signature(self, completion_id: str, algo: str) -> dict[str, Any] | None:
        """From the shared store (Redis), served only if signed by a key the gateway verified."""
        if self.redis is None:
            return None
        try:
            data = await self.redis.get(SIGNATURE_KEY + completion_id)
            usage_data = await self.redis.get(USAGE_KEY + completion_id)
        except OSError:
            return None
        record = decode_signature(data) if data is not None else None
        if record is None or not signature_verifies(record, self.pool):
            if data is not None:
                self.metrics.tampered.inc()
            return None
        answer: dict[str, Any] = {
            "text": record.text,
            "signing_algo": algo,
            "node": self.pool.node_of_key(record.signing_address),
        }
        if algo == "ecdsa":
            answer.update(signature=record.ecdsa.hex(), signing_address=record.signing_address)
        else:
            answer.update(
                signature=record.ed25519.hex(),
                signing_public_key=record.ed25519_public_key.hex(),
                signing_address=record.signing_address,
            )
        usage = decode_usage(usage_data) if usage_data is not None else None
        if (
            usage is not None
            and usage.usage.completion_id == completion_id
            and usage_verifies(usage, self.pool)
        ):
            answer.update(usage.fields(algo))
        return answer

    async def _asked_signature(self, completion_id: str, algo: str) -> dict[str, Any] | None:
        """Asked of every verified node; the answer must verify under the key that node was verified with."""
        found: list[dict[str, Any]] = []

        async def ask(node: Node) -> None:
            try:
                response = await node.client.get(
                    f"{SIGNATURE_PREFIX}{completion_id}",
                    params={"signing_algo": algo},
                    timeout=self.config.node_timeout_s,
                )
                record = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                return
            if isinstance(record, dict) and node.identity is not None and _verifies(record, algo, node):
                if "usage_text" in record and not _usage_verifies(record, algo, node):
                    for name in ("usage", "usage_text", "usage_signature"):
                        record.pop(name, None)  # the completion's signature stands; its usage does not
                found.append({**record, "signing_address": node.identity.address, "node": node.url})

        async with anyio.create_task_group() as tasks:
            for node in self.pool.verified():
                tasks.start_soon(ask, node)
        return found[0] if found else None


def _verifies(record: dict[str, Any], algo: str, node: Node) -> bool:
    assert node.identity is not None
    text, signature = record.get("text"), record.get("signature")
    if not isinstance(text, str) or not isinstance(signature, str):
        return False
    try:
        raw = bytes.fromhex(signature)
    except ValueError:
        return False
    if algo == "ecdsa":
        return ecdsa_signature_matches(text, raw, node.identity.address)
    return ed25519_signature_matches(text, raw, node.identity.ed25519_public_key)


def _usage_verifies(record: dict[str, Any], algo: str, node: Node) -> bool:
    assert node.identity is not None
    if algo == "ecdsa":
        usage, _ = verify_usage(record, address=node.identity.address)
    else:
        usage, _ = verify_usage(record, public_key=node.identity.ed25519_public_key.hex())
    return usage is not None
