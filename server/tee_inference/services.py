"""What one serving process holds: the boot key, the signature store, metrics, the gate's model list.

`boot.boot` (or `boot.resume`, in a vLLM API process) builds it once; the request path only
reads it. Nothing here is global: two servers in one process (as in the tests) share nothing.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import SecretStr

from tee_inference.admission import AdmissionControl
from tee_inference.asgi import ASGIApp, Scope
from tee_inference.config import ServerConfig
from tee_inference.e2ee import ReplayGuard
from tee_inference.keys import BootKeys
from tee_inference.metrics import ServingMetrics
from tee_inference.reports import AttestationService
from tee_inference.shared_store import SharedReplayGuard, UsageStore, node_kv, node_stores
from tee_inference.signing import CompletionSigner
from tee_inference.store import MemorySignatureStore, SignatureStore
from tee_inference.subrequest import call_app
from tee_inference.tee import GpuProvider, TdxProvider

if TYPE_CHECKING:
    from tee_inference.boot_state import BootState


class ServedModels:
    """The models the gate lets through: configured, or asked of the engine until it answers.

    Only base models count: adapters the engine might list (LoRA) were not measured with
    the weights, so they are not confidential in our sense. Asking is bounded: one question
    at a time, `timeout_s` at most, and a failed answer is reused for `retry_s` so that a down
    engine costs each request nothing; no request waits longer than one question's bound.
    """

    def __init__(self, configured: tuple[str, ...], *, timeout_s: float = 10.0, retry_s: float = 1.0) -> None:
        self._names: frozenset[str] | None = frozenset(configured) if configured else None
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._asking: anyio.Event | None = None
        self._failed_at = -retry_s

    async def names(self, app: ASGIApp, scope: Scope) -> frozenset[str] | None:
        """The served names, or None while the engine cannot say (not ready, down, or silent)."""
        if self._names is not None or anyio.current_time() - self._failed_at < self.retry_s:
            return self._names
        if self._asking is not None:
            with anyio.move_on_after(self.timeout_s):
                await self._asking.wait()
            return self._names
        self._asking = asking = anyio.Event()
        try:
            self._names = await self._discover(app, scope, self.timeout_s)
        finally:
            if self._names is None:
                self._failed_at = anyio.current_time()
            self._asking = None
            asking.set()
        return self._names

    @staticmethod
    async def _discover(app: ASGIApp, scope: Scope, timeout_s: float) -> frozenset[str] | None:
        status, _, body = await call_app(app, scope, "GET", "/v1/models", limit=1 << 20, timeout_s=timeout_s)
        if status != 200:
            return None
        try:
            data = json.loads(body)["data"]
            names = frozenset(
                m["id"] for m in data if isinstance(m.get("id"), str) and m.get("parent") is None
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None
        return names or None


@dataclass
class Services:
    config: ServerConfig
    keys: BootKeys
    store: SignatureStore
    metrics: ServingMetrics
    models: ServedModels
    admission: AdmissionControl
    attestation: AttestationService
    info: dict[str, Any]
    # Signed usage per completion (metering.py), shared as the signatures are (shared_store.py).
    usage: UsageStore
    api_key: SecretStr | None = None
    # Set by the process that ran the boot, so a launcher can hand it to vLLM's API processes.
    boot_state: BootState | None = None
    # Encapsulated keys of encrypted requests already answered (bounded; e2ee.py), and the same
    # across the processes and replicas sharing a store (shared_store.py), when there is one.
    e2ee_replays: ReplayGuard = field(default_factory=ReplayGuard)
    shared_replays: SharedReplayGuard | None = None

    @classmethod
    def assemble(
        cls,
        config: ServerConfig,
        tdx: TdxProvider,
        gpu: GpuProvider,
        keys: BootKeys,
        info: dict[str, Any],
    ) -> Services:
        metrics = ServingMetrics()
        store = MemorySignatureStore(
            ttl_s=config.signature_ttl_s,
            max_entries=config.signature_max_entries,
            max_bytes=config.signature_max_bytes,
            on_evict=lambda reason: metrics.store_evictions.labels(reason).inc(),
            on_collision=lambda _: metrics.store_collisions.inc(),
        )
        metrics.store_entries.set_function(lambda: len(store))
        # Written through to Redis or the launcher's store when the configuration names one.
        kv = node_kv(config)
        signatures, usage = node_stores(
            config, keys.signer, store, kv, lambda kind: metrics.shared_store_tampered.labels(kind).inc()
        )
        replays = ReplayGuard()
        admission = AdmissionControl(
            max_inflight=config.max_inflight_completions,
            max_ttft_s=config.max_ttft_s,
            max_body_bytes=config.max_inflight_request_bytes,
        )
        metrics.inflight.set_function(lambda: admission.inflight)
        attestation = AttestationService(
            tdx=tdx,
            gpu=gpu,
            keys=keys,
            info=info,
            server_nonce_ttl_s=config.report_cache_ttl_s,
            collection_timeout_s=config.report_timeout_s,
        )
        return cls(
            config=config,
            keys=keys,
            store=signatures,
            metrics=metrics,
            models=ServedModels(config.served_models, timeout_s=config.engine_timeout_s),
            admission=admission,
            attestation=attestation,
            info=info,
            api_key=config.api_key(),
            usage=usage,
            e2ee_replays=replays,
            shared_replays=SharedReplayGuard(kv, replays.ttl_s) if kv is not None else None,
        )

    @property
    def signer(self) -> CompletionSigner:
        return self.keys.signer

    def model_info(self) -> dict[str, object]:
        """What /v1/models adds to each served model."""
        return {
            "model_weights_root": self.info.get("model_weights_root"),
            "tee": self.config.tee,
            "simulated": self.config.tee == "simulated",
        }

    def authorized(self, authorization: bytes | None) -> bool:
        """Bearer check; True when no token is configured.

        The scheme is case-insensitive (RFC 7235 §2.1) and may be followed by several spaces; the
        token is compared in constant time (its length aside).
        """
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or b"").partition(b" ")
        expected = self.api_key.get_secret_value().encode("utf-8")
        token_ok = hmac.compare_digest(token.lstrip(b" "), expected)
        return token_ok and scheme.lower() == b"bearer"
