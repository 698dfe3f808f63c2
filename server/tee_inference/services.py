"""What one serving process holds: the boot key, the signature store, metrics, the gate's model list.

Built once from the configuration when the server (or vLLM, through our middleware)
starts. Nothing here is global: two servers in one process (as in the tests) share nothing.
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass

import anyio
from pydantic import SecretStr

from tee_inference.asgi import ASGIApp, Scope
from tee_inference.boot import (
    TrustRoots,
    boot_info,
    make_trust_roots,
    measure_weights,
    preflight,
    record_boot_events,
    refuse_on_failures,
)
from tee_inference.config import ConfigError, ServerConfig
from tee_inference.keys import FileKeySource, KeySource, RandomKeySource, load_signer
from tee_inference.metrics import ServingMetrics
from tee_inference.reports import AttestationService
from tee_inference.signing import CompletionSigner
from tee_inference.store import MemorySignatureStore, SignatureStore
from tee_inference.subrequest import call_app

log = logging.getLogger("tee_inference")


def make_key_source(config: ServerConfig) -> KeySource:
    if config.key_source == "random":
        return RandomKeySource()
    if config.key_source == "file":
        assert config.key_file is not None  # the config validator guarantees it
        return FileKeySource(config.key_file)
    from tee_inference.tee.dstack import DstackKeySource

    return DstackKeySource(config.dstack_socket, config.dstack_key_path)


class ServedModels:
    """The models the gate lets through: configured, or asked of the engine once.

    Only base models count: adapters the engine might list (LoRA) were not measured with
    the weights, so they are not confidential in our sense.
    """

    def __init__(self, configured: tuple[str, ...]) -> None:
        self._names: frozenset[str] | None = frozenset(configured) if configured else None
        self._lock = anyio.Lock()

    @property
    def known(self) -> frozenset[str] | None:
        return self._names

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
    signer: CompletionSigner
    store: SignatureStore
    metrics: ServingMetrics
    models: ServedModels
    key_source_name: str
    attestation: AttestationService
    weights_root: str | None = None
    api_key: SecretStr | None = None

    @classmethod
    def start(cls, config: ServerConfig, roots: TrustRoots | None = None) -> Services:
        """Boot: trust roots checked (tdx), key derived, weights measured, RTMR3 extended.

        `roots` defaults to the providers the configuration names; tests pass providers
        built on faithful fakes of the kernel and driver interfaces.
        """
        source = make_key_source(config)
        if config.tee == "tdx" and source.development_only:
            raise ConfigError(f"key source {source.name!r} is for development only and refused with tdx")
        roots = roots or make_trust_roots(config)
        if config.tee == "tdx":
            refuse_on_failures(preflight(config, roots, source))
        signer = load_signer(source, config.key_epoch)
        weights_root = measure_weights(config)
        record_boot_events(roots.tdx, config, signer, source.name, weights_root)
        attestation = AttestationService(
            tdx=roots.tdx,
            gpu=roots.gpu,
            signer=signer,
            info=boot_info(config, roots, signer, source.name, weights_root),
            server_nonce_ttl_s=config.report_cache_ttl_s,
        )
        metrics = ServingMetrics()
        store = MemorySignatureStore(
            ttl_s=config.signature_ttl_s,
            max_entries=config.signature_max_entries,
            max_bytes=config.signature_max_bytes,
            on_evict=lambda reason: metrics.store_evictions.labels(reason).inc(),
        )
        metrics.store_entries.set_function(lambda: len(store))
        services = cls(
            config=config,
            signer=signer,
            store=store,
            metrics=metrics,
            models=ServedModels(config.served_models),
            key_source_name=source.name,
            attestation=attestation,
            weights_root=weights_root,
            api_key=config.api_key(),
        )
        log.info(
            "signing address %s, ed25519 key %s (key source %s, epoch %d, tee %s)",
            signer.ecdsa.address,
            signer.ed25519.public_key.hex(),
            source.name,
            signer.epoch,
            config.tee,
        )
        return services

    def model_info(self) -> dict[str, object]:
        """What /v1/models adds to each served model."""
        return {
            "model_weights_root": self.weights_root,
            "tee": self.config.tee,
            "simulated": self.config.tee == "simulated",
        }

    def authorized(self, authorization: bytes | None) -> bool:
        """Constant-time bearer check; True when no token is configured."""
        if self.api_key is None:
            return True
        expected = b"Bearer " + self.api_key.get_secret_value().encode("utf-8")
        return hmac.compare_digest(authorization or b"", expected)
