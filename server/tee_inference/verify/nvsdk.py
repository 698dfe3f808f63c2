"""NVIDIA's nv-attestation-sdk as an optional, extra GPU check (``gpu_nvidia_sdk``).

The SDK pins cryptography, PyJWT and pyOpenSSL to versions that conflict with ours, so it never
enters the core install: ``scripts/nvsdk-env.sh`` builds ``build/nvsdk-venv`` and this module
runs ``nvsdk_bridge.py`` there as a subprocess, JSON in on stdin and JSON out on stdout. The
check adds NVIDIA's own code's opinion next to ours; it replaces none of our GPU checks.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tee_inference.attestation.nvidia_payload import NvidiaPayload
from tee_inference.verify.results import CheckResult

GPU_NVIDIA_SDK: Final = "gpu_nvidia_sdk"
BRIDGE: Final = Path(__file__).with_name("nvsdk_bridge.py")
REPO_ROOT: Final = Path(__file__).resolve().parents[3]
DEFAULT_PYTHON: Final = REPO_ROOT / "build" / "nvsdk-venv" / "bin" / "python"
NOT_INSTALLED: Final = "nv-attestation-sdk backend not installed: run scripts/nvsdk-env.sh"


@dataclass(frozen=True)
class NvidiaSdkBackend:
    """Runs the bridge with ``python`` (the SDK venv's interpreter).

    ``network_timeout_s`` bounds each call the SDK makes to NVIDIA's OCSP and RIM services;
    ``timeout_s`` in :meth:`verify` bounds the whole subprocess.
    """

    python: Path = DEFAULT_PYTHON
    bridge: Path = BRIDGE
    network_timeout_s: float = 5.0

    def installed(self) -> bool:
        return self.python.is_file()

    def verify(self, payload: NvidiaPayload, nonce: bytes, timeout_s: float = 120.0) -> CheckResult:
        """One ``gpu_nvidia_sdk`` result: pass, fail (the SDK rejected the evidence) or skip."""
        if not self.installed():
            return CheckResult.skipped(GPU_NVIDIA_SDK, f"{NOT_INSTALLED} ({self.python} is missing)")
        evidence = json.loads(payload.to_json())["evidence_list"]
        request = {
            "nonce": nonce.hex(),
            "evidence_list": evidence,
            "mode": "local",
            "network_timeout_s": self.network_timeout_s,
        }
        try:
            # The SDK writes attestation_sdk.log and verifier.log into its working directory:
            # a throw-away one, never the caller's.
            with tempfile.TemporaryDirectory(prefix="tee-inference-nvsdk-") as scratch:
                done = subprocess.run(  # our own interpreter path and script, no shell
                    [str(self.python), "-I", str(self.bridge)],  # -I: no PYTHON* env, no script dir
                    input=json.dumps(request),
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                    check=False,
                    cwd=scratch,
                )
        except subprocess.TimeoutExpired:
            return CheckResult.failed(GPU_NVIDIA_SDK, f"nv-attestation-sdk gave no answer in {timeout_s:g} s")
        except OSError as exc:
            return CheckResult.failed(GPU_NVIDIA_SDK, f"cannot run {self.python}: {exc}")
        answer = _parse_answer(done.stdout)
        if answer is None:
            tail = " ".join((done.stderr or done.stdout).split()[-30:])
            return CheckResult.failed(
                GPU_NVIDIA_SDK,
                f"nv-attestation-sdk bridge gave no well-formed answer (exit {done.returncode}): {tail}",
            )
        return _to_check(answer)


def _parse_answer(stdout: str) -> dict[str, Any] | None:
    """The bridge's JSON answer, or None when it is not the shape the protocol promises."""
    try:
        answer = json.loads(stdout)
    except ValueError:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        return None
    if not isinstance(answer.get("claims", {}), dict) or not isinstance(answer.get("steps", {}), dict):
        return None
    error = answer.get("error")
    if error is not None and not isinstance(error, str):
        return None
    return answer


def describe_steps(steps: dict[str, Any]) -> str:
    """Per GPU, which of the SDK's steps passed, e.g. ``GPU-0: passed arch-check, …; failed …``."""
    parts = []
    for gpu, flags in sorted(steps.items()):
        if not isinstance(flags, dict):
            continue
        short = {k.removeprefix("x-nvidia-gpu-"): v for k, v in flags.items()}
        ok = [k for k, v in short.items() if v is True or v == "success"]
        bad = [k for k, v in short.items() if v is False or v == "fail"]
        line = f"{gpu}: passed {', '.join(ok) or 'nothing'}"
        if bad:
            line += f"; not passed {', '.join(bad)}"
        parts.append(line)
    return "; ".join(parts)


def _to_check(answer: dict[str, Any]) -> CheckResult:
    steps = describe_steps(answer.get("steps") or {})
    suffix = f" [{steps}]" if steps else ""
    if answer["ok"]:
        return CheckResult.passed(GPU_NVIDIA_SDK, f"nv-attestation-sdk: attestation passed{suffix}")
    error = answer.get("error") or "attestation failed"
    # NVIDIA's services being out of reach says nothing against the evidence: skip, not fail
    # (still blocking while the check is required, like a tcb_status without collateral).
    if answer.get("unreachable") is True:
        return CheckResult.skipped(GPU_NVIDIA_SDK, f"{error}{suffix}")
    return CheckResult.failed(GPU_NVIDIA_SDK, f"nv-attestation-sdk: {error}{suffix}")
