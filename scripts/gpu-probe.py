#!/usr/bin/env python3
"""Print, as JSON, what NVML says about confidential computing here, then run NvmlGpuProvider.

Read-only: it calls NVML getters only and never changes a GPU setting (no ready-state set, no
reset). Run it from the repository root on a GPU host:

    python3 scripts/gpu-probe.py

It needs nvidia-ml-py; the provider part also needs the package's `cryptography`. Whatever is
missing is reported in the JSON instead of stopping the probe.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))


def _error(exc: BaseException) -> dict[str, Any]:
    try:
        text = str(exc)
    except Exception:  # pynvml may fail to fetch the text of an unknown code
        text = ""
    return {"error": type(exc).__name__, "code": getattr(exc, "value", None), "text": text}


def attempt(function: Callable[..., Any], *args: Any, shape: Callable[[Any], Any] = lambda v: v) -> Any:
    try:
        return {"ok": shape(function(*args))}
    except Exception as exc:
        return _error(exc)


def nvml_facts() -> dict[str, Any]:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError as exc:
        return {"import": _error(exc)}
    from importlib.metadata import PackageNotFoundError, version

    try:
        facts: dict[str, Any] = {"nvidia_ml_py": version("nvidia-ml-py")}
    except PackageNotFoundError:
        facts = {"nvidia_ml_py": None}
    facts["init"] = attempt(pynvml.nvmlInit)
    if "error" in facts["init"]:
        return facts
    try:
        facts["driver"] = attempt(pynvml.nvmlSystemGetDriverVersion)
        facts["nvml"] = attempt(pynvml.nvmlSystemGetNVMLVersion)
        facts["cuda_driver"] = attempt(pynvml.nvmlSystemGetCudaDriverVersion)
        facts["cc_state"] = attempt(
            pynvml.nvmlSystemGetConfComputeState,
            shape=lambda s: {
                "environment": s.environment,
                "ccFeature": s.ccFeature,
                "devToolsMode": s.devToolsMode,
            },
        )
        facts["cc_capabilities"] = attempt(
            pynvml.nvmlSystemGetConfComputeCapabilities,
            shape=lambda c: {"cpuCaps": c.cpuCaps, "gpusCaps": c.gpusCaps},
        )
        facts["cc_ready_state"] = attempt(pynvml.nvmlSystemGetConfComputeGpusReadyState)
        count = pynvml.nvmlDeviceGetCount()
        facts["gpus"] = []
        nonce = os.urandom(32)
        for index in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            facts["gpus"].append(
                {
                    "index": index,
                    "name": attempt(pynvml.nvmlDeviceGetName, handle),
                    "architecture": attempt(pynvml.nvmlDeviceGetArchitecture, handle),
                    "cc_mem_size": attempt(
                        pynvml.nvmlDeviceGetConfComputeMemSizeInfo,
                        handle,
                        shape=lambda m: {
                            "protectedMemSizeKib": m.protectedMemSizeKib,
                            "unprotectedMemSizeKib": m.unprotectedMemSizeKib,
                        },
                    ),
                    "attestation_report": attempt(
                        pynvml.nvmlDeviceGetConfComputeGpuAttestationReport,
                        handle,
                        nonce,
                        shape=lambda r: {
                            "attestationReportSize": r.attestationReportSize,
                            "isCecAttestationReportPresent": r.isCecAttestationReportPresent,
                            "head": bytes(r.attestationReport)[:40].hex(),
                        },
                    ),
                    "certificate": attempt(
                        pynvml.nvmlDeviceGetConfComputeGpuCertificate,
                        handle,
                        shape=lambda c: {
                            "certChainSize": c.certChainSize,
                            "attestationCertChainSize": c.attestationCertChainSize,
                        },
                    ),
                }
            )
    finally:
        pynvml.nvmlShutdown()
    return facts


def provider_run() -> dict[str, Any]:
    try:
        from tee_inference.tee.gpu_nvml import NvmlGpuProvider
    except ImportError as exc:
        return {"import": _error(exc)}
    provider = NvmlGpuProvider()
    result: dict[str, Any] = {
        "check": [{"name": r.name, "ok": r.ok, "detail": r.detail} for r in provider.check()]
    }
    try:
        payload = provider.evidence(os.urandom(32))
        result["evidence"] = {
            "ok": {"gpus": len(payload.entries), "arch": payload.arch, "bytes": len(payload.to_json())}
        }
    except Exception as exc:
        result["evidence"] = _error(exc) | {"message": str(exc)}
    return result


def main() -> int:
    print(json.dumps({"nvml": nvml_facts(), "provider": provider_run()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
