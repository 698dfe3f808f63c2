"""Checks across the devices of one payload: distinct devices, architectures, NVSwitch topology.

Each entry of ``evidence_list`` becomes a ``Device``: what its chain and report showed after
:func:`tee_inference.verify.gpu.check_gpu` examined it. These checks judge the set:

- ``gpu_distinct``: no two entries name the same device (leaf serial ``ueid``, or the key of
  the ``… BROM`` identity certificate); eight copies of one GPU's evidence are one GPU.
- ``gpu_arch``: every ``arch`` (the payload's and each entry's) is a known NVIDIA architecture
  the policy allows, and agrees with the chip the signed chain names (GH100 ↔ HOPPER).
- ``gpu_topology``: with NVSwitch evidence, the 8 GPUs and 4 switches form one HGX board.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509

from tee_inference.attestation.nvidia_devices import (
    GPU_ARCHES,
    KNOWN_ARCHES,
    LS10,
    DeviceIdentity,
    chain_arch,
    chain_chip,
    device_identity,
    duplicate_devices,
    topology_problems,
)
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload
from tee_inference.attestation.nvidia_spdm import GpuEvidence
from tee_inference.verify.policy import GpuPolicy
from tee_inference.verify.results import CheckResult

GPU_DISTINCT, GPU_ARCH, GPU_TOPOLOGY = "gpu_distinct", "gpu_arch", "gpu_topology"
_KNOWN: Final = ", ".join(sorted(KNOWN_ARCHES))


@dataclass(frozen=True)
class Device:
    """One ``evidence_list`` entry as examined: its chain, the anchor it led to, its parsed report."""

    index: int
    entry: GpuEvidenceEntry
    certificates: tuple[x509.Certificate, ...] = ()  # as decoded; () when they did not
    anchor: x509.Certificate | None = None  # the root the chain verified to; None when it did not
    evidence: GpuEvidence | None = None
    signed: bool = False  # the report's signature verified with the leaf of a trusted chain

    @property
    def arch(self) -> str:
        """The architecture the signed chain names, else the entry's unsigned label."""
        return chain_arch(self.certificates) or self.entry.arch

    @property
    def is_switch(self) -> bool:
        return self.arch == LS10

    @property
    def label(self) -> str:
        return f"{'NVSwitch' if self.is_switch else 'GPU'} {self.index}"

    @property
    def identity(self) -> DeviceIdentity | None:
        return device_identity(self.certificates) if self.certificates else None


def check_distinct(devices: Sequence[Device]) -> CheckResult:
    labelled = [(d.label, d.identity) for d in devices]
    problems = [f"{label}: no certificate chain to tell it apart by" for label, i in labelled if i is None]
    problems += duplicate_devices((label, i) for label, i in labelled if i is not None)
    if problems:
        return CheckResult.failed(GPU_DISTINCT, "; ".join(problems))
    return CheckResult.passed(
        GPU_DISTINCT, f"{len(devices)} distinct device(s) by leaf serial (ueid) and BROM identity key"
    )


def _arch_problem(label: str, arch: str, policy: GpuPolicy) -> str | None:
    if arch not in KNOWN_ARCHES:
        return f"{label} arch {arch!r} is no known NVIDIA CC architecture (known: {_KNOWN})"
    if arch not in policy.allowed:
        allowed = ", ".join(sorted(policy.allowed))
        return f"{label} arch {arch} is not allowed by the policy (allowed: {allowed})"
    return None


def check_arch(payload: NvidiaPayload, devices: Sequence[Device], policy: GpuPolicy) -> CheckResult:
    problems = [p for p in [_arch_problem("payload", payload.arch, policy)] if p]
    seen: Counter[str] = Counter()
    for device in devices:
        label, arch = device.label, device.entry.arch
        problem = _arch_problem(f"{label}:", arch, policy)
        if problem:
            problems.append(problem)
        signed, chip = chain_arch(device.certificates), chain_chip(device.certificates)
        if device.certificates and signed is None:
            problems.append(f"{label}: its chain names chip {chip!r}, of no known architecture")
        elif signed is not None and signed != arch:
            problems.append(f"{label}: arch {arch}, but its chain is a {chip} ({signed})")
        elif arch in GPU_ARCHES and payload.arch in GPU_ARCHES and arch != payload.arch:
            problems.append(f"{label}: arch {arch} differs from the payload's {payload.arch}")
        seen[f"{arch} ({chip} chain)" if chip else arch] += 1
    if problems:
        return CheckResult.failed(GPU_ARCH, "; ".join(problems))
    shown = ", ".join(f"{n} × {what}" for what, n in sorted(seen.items()))
    return CheckResult.passed(GPU_ARCH, f"{shown}; allowed: {', '.join(sorted(policy.allowed))}")


def check_topology(devices: Sequence[Device]) -> CheckResult:
    switches = [d for d in devices if d.is_switch]
    if not switches:
        return CheckResult.skipped(
            GPU_TOPOLOGY, "no NVSwitch evidence: topology not checked (only an 8-GPU HGX board has it)",
            required=False,
        )  # fmt: skip
    problems = [f"{d.label}: report not verified, so not used" for d in devices if not d.signed]
    trusted = [d for d in devices if d.signed and d.evidence is not None]
    problems += topology_problems(
        [(d.label, d.evidence) for d in trusted if d.evidence is not None and not d.is_switch],
        [(d.label, d.evidence) for d in trusted if d.evidence is not None and d.is_switch],
    )
    if problems:
        return CheckResult.failed(GPU_TOPOLOGY, "; ".join(problems))
    return CheckResult.passed(
        GPU_TOPOLOGY,
        f"{len(devices) - len(switches)} GPUs and {len(switches)} NVSwitches form one HGX board: "
        "every GPU sees the same switches, every switch serves the same GPUs",
    )
