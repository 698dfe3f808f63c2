"""The GPU ready gate: attest this CVM's own GPUs (and NVSwitches) at boot, only then let them work.

An H100 in confidential-computing mode refuses work until the CC *ready state* is set
(``nvmlSystemSetConfComputeGpusReadyState(1)``, what ``nvidia-smi conf-compute -srs 1`` does).
Whoever sets it vouches for the GPUs; public CVM images have set it unconditionally at boot and
let devtools mode pass. ``serve --gpu-ready-gate`` sets it only after this process has attested
every device itself, for a nonce it chose:

    1. NVML state: environment PROD, CC capable, CC on, devtools off        (else: never set ready)
    2. evidence for a fresh 32-byte nonce from every GPU, and from every NVSwitch when NVML says
       the GPUs are in protected-PCIe mode (HGX: 8 GPUs, 4 NVSwitches)
    3. the verifier's own checks on it (tee_inference.verify.gpu), none skipped:
       chain to NVIDIA's pinned Device Identity CA, SPDM signature by the leaf, nonce, FWID,
       distinct devices, architecture, and the 8 ↔ 4 topology when switches are present
    4. only then ready state 1, read back to confirm

What was attested goes into RTMR3 as ``tee-inference:gpu-gate`` (``GateRecord.payload``): the
policy and each device's identity (NVIDIA's ``ueid`` and the BROM identity key, as
:mod:`tee_inference.attestation.nvidia_devices` names them). A verifier then checks that the GPU
evidence of every later report comes from exactly these devices (``gpu_binding``), which the
shared nonce alone does not show.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tee_inference.attestation.nvidia_devices import LS10
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload
from tee_inference.exceptions import TrustRootError
from tee_inference.verify.gpu import check_gpu
from tee_inference.verify.gpu_devices import GPU_TOPOLOGY
from tee_inference.verify.policy import SimulatedPolicy, VerificationPolicy
from tee_inference.verify.results import Status

GATE_FORMAT: Final = "tee-inference-gpu-gate/v1"
# The local checks that must pass (gpu_rim and gpu_ocsp need NVIDIA's services: not at boot).
REQUIRED_CHECKS: Final = ("gpu_chain", "gpu_evidence", "gpu_nonce", "gpu_distinct", "gpu_arch")
NVATTEST_TIMEOUT_S: Final = 300.0


class GpuGateError(TrustRootError):
    """The boot's local attestation of its own GPUs failed; the ready state was not set."""


@dataclass(frozen=True)
class GateRecord:
    """What the gate attested: the RTMR3 ``tee-inference:gpu-gate`` event's payload."""

    nonce: bytes
    devices: tuple[dict[str, Any], ...]  # index, kind (gpu | nvswitch), arch, ueid, identity_key_sha256
    policy: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {
            "format": GATE_FORMAT,
            "nonce": self.nonce.hex(),
            "policy": dict(self.policy),
            "devices": [dict(d) for d in self.devices],
            "ready_state": 1,
        }

    @property
    def gpus(self) -> int:
        return sum(1 for d in self.devices if d["kind"] == "gpu")

    @property
    def switches(self) -> int:
        return sum(1 for d in self.devices if d["kind"] == "nvswitch")


class SwitchEvidenceSource(Protocol):
    """NVSwitch evidence for a nonce. NVML has no NVSwitch calls: NVIDIA serves switches over NSCQ."""

    def evidence(self, nonce: bytes) -> tuple[GpuEvidenceEntry, ...]: ...


class NvattestSwitchSource:
    """NVSwitch evidence from NVIDIA's ``nvattest`` CLI (attestation-sdk, NSCQ underneath).

    ``nvattest collect-evidence --device nvswitch --format json`` prints ``{"evidences":
    [{"evidence": b64, "certificate": b64}, …], "result_code": 0, "result_message": …}`` (the form
    Tinfoil's boot reads). The nonce is passed with ``--nonce``; whatever nvattest does with it,
    every report's signed nonce is checked by the gate, so evidence for another nonce is refused.
    """

    def __init__(self, command: Sequence[str] = ("nvattest",), timeout_s: float = NVATTEST_TIMEOUT_S) -> None:
        self.command = tuple(command)
        self.timeout_s = timeout_s

    def evidence(self, nonce: bytes) -> tuple[GpuEvidenceEntry, ...]:
        argv = [*self.command, "collect-evidence", "--device", "nvswitch", "--format", "json"]
        argv += ["--nonce", nonce.hex()]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=self.timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GpuGateError(f"NVSwitch evidence: {' '.join(argv[:4])} did not run: {exc}") from None
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
            raise GpuGateError(f"NVSwitch evidence: nvattest exited {done.returncode}: {tail[0][:200]}")
        return parse_nvattest_evidence(done.stdout)


def parse_nvattest_evidence(output: bytes) -> tuple[GpuEvidenceEntry, ...]:
    """Entries (arch LS10) from ``nvattest collect-evidence --format json`` output."""
    try:
        document = json.loads(output)
        if int(document.get("result_code", -1)) != 0:
            raise GpuGateError(f"NVSwitch evidence: nvattest says {document.get('result_message')!r}")
        return tuple(
            GpuEvidenceEntry(
                evidence=base64.b64decode(item["evidence"], validate=True),
                certificate_chain_pem=base64.b64decode(item["certificate"], validate=True),
                arch=LS10,
            )
            for item in document["evidences"]
        )
    except GpuGateError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GpuGateError(f"NVSwitch evidence: not the output of nvattest collect-evidence: {exc}") from None


def _spki_sha256(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def attest_locally(
    payload: NvidiaPayload,
    nonce: bytes,
    nvidia_root: x509.Certificate,
    *,
    expect_switches: bool,
    allow_simulated: bool = False,
) -> GateRecord:
    """Run the verifier's GPU checks on our own evidence; the record, or GpuGateError with every reason."""
    policy = VerificationPolicy(simulated=SimulatedPolicy(allowed=allow_simulated))
    checks = check_gpu(payload.to_json(), nonce, policy, nvidia_root=nvidia_root)
    required = [*REQUIRED_CHECKS, GPU_TOPOLOGY] if expect_switches else list(REQUIRED_CHECKS)
    problems = [
        f"{c.name}: {c.detail}"
        for c in checks.checks
        if (c.name in required and c.status is not Status.PASS) or c.status is Status.FAIL
    ]
    if checks.simulated and not allow_simulated:
        problems.append("simulated evidence on a real GPU path")
    if len(checks.identities) != len(payload.entries):
        problems.append(f"{len(payload.entries) - len(checks.identities)} entries have no certificate chain")
    if problems:
        raise GpuGateError("GPU ready gate: " + "; ".join(problems))
    devices = []
    for index, (entry, identity) in enumerate(zip(payload.entries, checks.identities, strict=True)):
        devices.append({
            "index": index,
            "kind": "nvswitch" if entry.arch == LS10 else "gpu",
            "arch": entry.arch,
            "ueid": identity.ueid,
            "identity_key_sha256": identity.identity_key_sha256,
        })  # fmt: skip
    gate_policy = {
        "nvidia_root_spki_sha256": _spki_sha256(nvidia_root),
        "checks": sorted(required),
        "cc": "on",
        "devtools": "off",
        "environment": "PROD" if not allow_simulated else "SIMULATED",
        "multi_gpu_mode": "protected-pcie" if expect_switches else "none",
    }
    return GateRecord(nonce, tuple(devices), gate_policy)


def with_switches(payload: NvidiaPayload, switches: Sequence[GpuEvidenceEntry]) -> NvidiaPayload:
    """The GPUs' payload with NVSwitch entries appended (the payload's arch stays the GPUs')."""
    return NvidiaPayload(nonce=payload.nonce, entries=(*payload.entries, *switches), arch=payload.arch)
