"""A simulated GPU trust root: SPDM evidence under a local chain whose names all say SIMULATED.

The bytes are the real layout (see :mod:`tee_inference.attestation.nvidia_simulated`), so every
structural check a verifier makes holds; only the root is a simulation root, which a verifier
accepts when told to allow simulated reports.
"""

from __future__ import annotations

import hashlib
import os

from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload, check_nonce
from tee_inference.attestation.nvidia_simulated import SimulatedGpu
from tee_inference.tee import JsonState, StartCheck
from tee_inference.tee.gpu_gate import GateRecord, GpuGateError, attest_locally


class SimulatedGpuProvider:
    """``gpu_count`` simulated GPUs; with a 32-byte ``seed`` their keys and evidence are fixed."""

    name = "simulated"
    simulated = True

    def __init__(self, seed: bytes | None = None, *, gpu_count: int = 1, ready_gate: bool = False) -> None:
        if gpu_count < 1:
            raise ValueError(f"gpu_count must be at least 1, got {gpu_count}")
        if seed is not None and len(seed) != 32:
            raise ValueError(f"seed must be 32 bytes, got {len(seed)}")
        self._seed = bytes(seed) if seed is not None else os.urandom(32)
        # Each GPU gets its own device chain, as real boards do.
        self._gpus = tuple(
            SimulatedGpu(hashlib.sha256(self._seed + index.to_bytes(4, "big")).digest())
            for index in range(gpu_count)
        )
        self._ready_gate = ready_gate
        self._gate: GateRecord | None = None

    @property
    def gpus(self) -> tuple[SimulatedGpu, ...]:
        """The simulated devices, for tests and verifiers that need their root certificates."""
        return self._gpus

    def check(self) -> list[StartCheck]:
        if not self._ready_gate:
            return [StartCheck("gpu", True, "simulated")]
        # The real gate's checks, on the simulated devices (each chain ends at its own SIMULATED root).
        nonce = os.urandom(32)
        try:
            record = attest_locally(
                self.evidence(nonce), nonce, self._gpus[0].root_certificate,
                expect_switches=False, allow_simulated=True,
            )  # fmt: skip
        except GpuGateError as exc:
            return [StartCheck("gpu.ready-gate", False, str(exc))]
        self._gate = record
        return [StartCheck("gpu.ready-gate", True, f"{record.gpus} simulated GPU(s) attested locally")]

    def gate_record(self) -> JsonState | None:
        return self._gate.payload() if self._gate is not None else None

    def state(self) -> JsonState:
        return {"seed": self._seed.hex(), "gpu_count": len(self._gpus)}

    def evidence(self, nonce: bytes) -> NvidiaPayload:
        nonce = check_nonce(nonce)
        entries = tuple(
            GpuEvidenceEntry(gpu.evidence(nonce), gpu.certificate_chain_pem()) for gpu in self._gpus
        )
        return NvidiaPayload(nonce=nonce, entries=entries)
