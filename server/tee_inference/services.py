"""What one serving process holds: the boot key, the signature store, metrics, the gate's model list.

`boot.boot` (or `boot.resume`, in a vLLM API process) builds it once; the request path only
reads it. Nothing here is global: two servers in one process (as in the tests) share nothing.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import SecretStr

from tee_inference.asgi import ASGIApp, Scope
from tee_inference.config import ServerConfig
from tee_inference.keys import BootKeys
from tee_inference.metrics import ServingMetrics
from tee_inference.reports import AttestationService
from tee_inference.signing import CompletionSigner
from tee_inference.store import MemorySignatureStore, SignatureStore
from tee_inference.subrequest import call_app
from tee_inference.tee import GpuProvider, TdxProvider

if TYPE_CHECKING:
    from tee_inference.boot import BootState


class ServedModels:
    """The models the gate lets through: configured, or asked of the engine once.

    Only base models count: adapters the engine might list (LoRA) were not measured with
    the weights, so they are not confidential in our sense.
    """

    def __init__(self, configured: tuple[str, ...]) -> None:
        self._names: frozenset[str] | None = frozenset(configured) if configured else None
        self._lock = anyio.Lock()

    async def names(self, app: ASGIApp, scope: Scope) -> frozenset[str] | None:
        """The served names, or None while the engine cannot say (not ready yet)."""
        if self._names is not None:
            return self._names
        async with self._lock:
            if self._names is None:
                self._names = await self._discover(app, scope)
        return self._names

    @staticmethod
    async def _discover(app: ASGIApp, scope: Scope) -> frozenset[str] | None:
        status, _, body = await call_app(app, scope, "GET", "/v1/models", limit=1 << 20)
        if status != 200:
            return None
        try:
            data = json.loads(body)["data"]
            names = frozenset(
                m["id"] for m in data if isinstance(m.get("id"), str) and m.get("parent") is None
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return names or None


@dataclass
class Services:
    config: ServerConfig
    keys: BootKeys
    store: SignatureStore
    metrics: ServingMetrics
    models: ServedModels
    attestation: AttestationService
    info: dict[str, Any]
    api_key: SecretStr | None = None
    # Set by the process that ran the boot, so a launcher can hand it to vLLM's API processes.
    boot_state: BootState | None = None

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
        )
        metrics.store_entries.set_function(lambda: len(store))
        attestation = AttestationService(
            tdx=tdx, gpu=gpu, keys=keys, info=info, server_nonce_ttl_s=config.report_cache_ttl_s
        )
        return cls(
            config=config,
            keys=keys,
            store=store,
            metrics=metrics,
            models=ServedModels(config.served_models),
            attestation=attestation,
            info=info,
            api_key=config.api_key(),
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
        """Constant-time bearer check; True when no token is configured."""
        if self.api_key is None:
            return True
        expected = b"Bearer " + self.api_key.get_secret_value().encode("utf-8")
        return hmac.compare_digest(authorization or b"", expected)
