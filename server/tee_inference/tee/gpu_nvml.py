"""GPU trust roots: NVIDIA confidential-computing state and per-GPU evidence.

`NvmlGpuProvider` asks the driver through NVML (nvidia-ml-py, imported only when a method
runs, so the simulated mode never needs it). Its simulated twin is `tee.gpu_simulated`.

Both produce an `NvidiaPayload` (SPEC §3's ``nvidia_payload``): one entry per GPU, each the raw
attestation report for the caller's 32-byte nonce and the device's certificate chain as PEM. When
NVML says the GPUs are in protected-PCIe mode (HGX: 8 GPUs, 4 NVSwitches) the NVSwitches' entries
follow (from a `SwitchEvidenceSource`: NVML has no NVSwitch calls), and without them no evidence
is given at all.

With ``ready_gate`` the start check does not wait for someone else to set the CC ready state: it
attests the GPUs itself and sets it (tee.gpu_gate); without, it refuses until the state is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any, Final

from cryptography import x509

from tee_inference.attestation.nvidia_certs import decode_certificate_chain
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload, check_nonce
from tee_inference.attestation.nvidia_spdm import GpuAttestationError, parse_gpu_evidence
from tee_inference.exceptions import TrustRootError
from tee_inference.tee import JsonState, StartCheck
from tee_inference.tee.gpu_gate import (
    GateRecord,
    GpuGateError,
    SwitchEvidenceSource,
    attest_locally,
    with_switches,
)

NONCE_SIZE: Final = 32
NVML_MISSING: Final = "nvidia-ml-py is not installed"
# nvmlDeviceGetArchitecture values (NVML_DEVICE_ARCH_*) that have confidential computing, by
# the name NRAS expects in ``arch``. Pinned here so that the mapping does not need pynvml.
NRAS_ARCH: Final = {9: "HOPPER", 10: "BLACKWELL"}
# NVML_CC_SYSTEM_* and NVML_CC_* values, likewise pinned (they are part of NVML's C ABI).
_CC_FEATURE_ENABLED: Final = 1
_DEVTOOLS_ON: Final = 1
_READY_TRUE: Final = 1
_GPUS_CC_CAPABLE: Final = 1
_READY_SET: Final = 1  # NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE
_MULTIGPU_PROTECTED_PCIE: Final = 1  # NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE
_NVML_SUCCESS: Final = 0
_ENVIRONMENTS: Final = {0: "UNAVAILABLE", 1: "SIM", 2: "PROD"}
_ENVIRONMENT_PROD: Final = 2
_CPU_CAPS: Final = {0: "none", 1: "AMD SEV", 2: "Intel TDX", 3: "AMD SEV-SNP", 4: "AMD SNP vTOM"}
_PEM_BEGIN: Final = b"-----BEGIN CERTIFICATE-----"


class NvmlUnavailableError(TrustRootError):
    """nvidia-ml-py is missing, or NVML could not start (no driver, no library)."""


class NvmlCallError(TrustRootError):
    """An NVML call failed; keeps NVML's error class name and code for the log and the tests."""

    def __init__(self, call: str, error_name: str, code: int | None, text: str, gpu: int | None) -> None:
        where = f"GPU {gpu}: " if gpu is not None else ""
        shown = f"{error_name} ({code})" if code is not None else error_name
        super().__init__(f"{where}{call} failed: {shown}{': ' + text if text else ''}")
        self.call = call
        self.error_name = error_name
        self.code = code
        self.gpu = gpu


class GpuNotConfidentialError(TrustRootError):
    """The GPUs are not in confidential-computing mode, so they cannot attest."""


class GpuEvidenceError(TrustRootError):
    """NVML answered, but with evidence that cannot be what was asked for."""


def _nvml_error(call: str, exc: BaseException, gpu: int | None) -> NvmlCallError:
    code = getattr(exc, "value", None)
    try:
        # pynvml's __str__ asks the library for codes it has no text for; never let that mask us.
        text = str(exc)
    except Exception:
        text = ""
    return NvmlCallError(call, type(exc).__name__, code if isinstance(code, int) else None, text, gpu)


def _sized(array: Any, size: int, what: str, gpu: int) -> bytes:
    """The first ``size`` bytes of a fixed ctypes array that NVML filled, checking the size."""
    data = bytes(array)
    if not 0 < size <= len(data):
        raise GpuEvidenceError(f"GPU {gpu}: NVML reported a {what} of {size} bytes (buffer {len(data)})")
    return data[:size]


class NvmlGpuProvider:
    """Real GPUs through NVML: CC state checks, and evidence for a nonce from every GPU.

    ``nvml`` is the pynvml module; tests pass a stand-in with the same functions, structures and
    error classes. Every call opens its own NVML session (init ... shutdown): NVML counts
    references, so concurrent calls from worker threads do not tear each other's session down.
    """

    name = "nvml"
    simulated = False

    def __init__(
        self,
        nvml: Any = None,
        *,
        ready_gate: bool = False,
        switches: SwitchEvidenceSource | None = None,
        nvidia_root: x509.Certificate | None = None,
        allow_simulated: bool = False,
    ) -> None:
        self._nvml = nvml
        self._ready_gate = ready_gate
        self._switches = switches
        self._nvidia_root = nvidia_root  # None: NVIDIA's pinned Device Identity CA
        self._gate: GateRecord | None = None
        # Tests only: the NVML fakes serve simulated device chains. boot never sets it.
        self._allow_simulated = allow_simulated

    def gate_record(self) -> JsonState | None:
        """The gate's record once it let the GPUs work (the gpu-gate event's payload), else None."""
        return self._gate.payload() if self._gate is not None else None

    def _module(self) -> Any:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError:
                raise NvmlUnavailableError(
                    f"{NVML_MISSING}: install it (pip install nvidia-ml-py) to use NVIDIA GPUs"
                ) from None
        return self._nvml

    def _call(self, nvml: Any, call: str, *args: Any, gpu: int | None = None) -> Any:
        try:
            function: Callable[..., Any] = getattr(nvml, call)
        except AttributeError:
            # An nvidia-ml-py older than the driver's confidential-computing API (12.535).
            raise NvmlUnavailableError(f"nvidia-ml-py has no {call}: upgrade nvidia-ml-py") from None
        try:
            return function(*args)
        except nvml.NVMLError as exc:
            raise _nvml_error(call, exc, gpu) from None

    @contextlib.contextmanager
    def _session(self) -> Iterator[Any]:
        nvml = self._module()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise NvmlUnavailableError(f"NVML did not start: {_nvml_error('nvmlInit', exc, None)}") from None
        try:
            yield nvml
        finally:
            # A failed shutdown leaves nothing to undo; the original error, if any, matters more.
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()

    def state(self) -> JsonState:
        return {}  # NVML is asked afresh by every process

    # Checks -----------------------------------------------------------------------------------

    def check(self) -> list[StartCheck]:
        """One line per condition: NVML, environment, capabilities, then per GPU CC, devtools, ready."""
        try:
            with self._session() as nvml:
                return self._checks(nvml)
        except TrustRootError as exc:
            return [StartCheck("nvml", False, str(exc))]

    def _checks(self, nvml: Any) -> list[StartCheck]:
        driver = self._call(nvml, "nvmlSystemGetDriverVersion")
        results = [
            StartCheck("nvml", True, f"NVML {self._call(nvml, 'nvmlSystemGetNVMLVersion')}, driver {driver}")
        ]
        count = int(self._call(nvml, "nvmlDeviceGetCount"))
        if count == 0:
            return [*results, StartCheck("gpu", False, "no NVIDIA GPU found")]
        state = self._call(nvml, "nvmlSystemGetConfComputeState")
        caps = self._call(nvml, "nvmlSystemGetConfComputeCapabilities")
        ready = int(self._call(nvml, "nvmlSystemGetConfComputeGpusReadyState"))

        environment = int(state.environment)
        env_name = _ENVIRONMENTS.get(environment, f"unknown ({environment})")
        results.append(
            StartCheck(
                "gpu.environment",
                environment == _ENVIRONMENT_PROD,
                f"confidential-computing environment is {env_name}"
                + ("" if environment == _ENVIRONMENT_PROD else ", not PROD"),
            )
        )
        cpu = _CPU_CAPS.get(int(caps.cpuCaps), f"unknown ({int(caps.cpuCaps)})")
        capable = int(caps.gpusCaps) == _GPUS_CC_CAPABLE
        results.append(
            StartCheck(
                "gpu.capabilities",
                capable,
                f"GPUs {'are' if capable else 'are not'} confidential-computing capable (CPU TEE: {cpu})",
            )
        )
        cc_on = int(state.ccFeature) == _CC_FEATURE_ENABLED
        devtools = int(state.devToolsMode) == _DEVTOOLS_ON
        gate = self._ready_gate and ready != _READY_TRUE  # the gate sets it; not yet a failure
        for gpu in range(count):
            # The CC, devtools and ready states are system-wide in NVML; a line per GPU says
            # which devices the refusal covers.
            results += [
                StartCheck(
                    f"gpu{gpu}.cc", cc_on, f"GPU {gpu}: confidential computing is {'on' if cc_on else 'off'}"
                ),
                StartCheck(
                    f"gpu{gpu}.devtools",
                    not devtools,
                    f"GPU {gpu}: devtools mode is {'on' if devtools else 'off'}",
                ),
                StartCheck(
                    f"gpu{gpu}.ready",
                    ready == _READY_TRUE or gate,
                    f"GPU {gpu}: ready"
                    if ready == _READY_TRUE
                    else f"GPU {gpu}: not ready yet; the ready gate below decides"
                    if gate
                    else f"GPU {gpu}: not ready (NVML ready state {ready}: not accepting work)",
                ),
            ]
        if self._ready_gate:
            return [*results, self._run_gate(nvml, [r for r in results if not r.ok])]
        if cc_on:
            # A state that looks right is not enough: fail closed unless evidence really comes.
            try:
                payload = self._collect(nvml, os.urandom(NONCE_SIZE))
                detail = f"evidence obtained from {len(payload.entries)} GPU(s), nonce matched"
                results.append(StartCheck("gpu.evidence", True, detail))
            except TrustRootError as exc:
                results.append(StartCheck("gpu.evidence", False, str(exc)))
        return results

    def _run_gate(self, nvml: Any, failed: list[StartCheck]) -> StartCheck:
        """Attest every device locally and only then set the ready state (tee.gpu_gate)."""
        if failed:
            return StartCheck(
                "gpu.ready-gate", False,
                f"not attempted ({failed[0].detail}): the GPUs' ready state was not set",
            )  # fmt: skip
        try:
            nonce = os.urandom(NONCE_SIZE)
            ppcie = self._protected_pcie(nvml)
            payload = self._collect(nvml, nonce, protected_pcie=ppcie)
            root = self._nvidia_root
            if root is None:
                from tee_inference.verify.trust import production_nvidia_root

                root = production_nvidia_root()
            record = attest_locally(
                payload, nonce, root, expect_switches=ppcie, allow_simulated=self._allow_simulated
            )
            self._call(nvml, "nvmlSystemSetConfComputeGpusReadyState", _READY_SET)
            now = int(self._call(nvml, "nvmlSystemGetConfComputeGpusReadyState"))
            if now != _READY_TRUE:
                raise GpuGateError(f"the ready state reads {now} after it was set")
        except TrustRootError as exc:
            return StartCheck("gpu.ready-gate", False, f"{exc}; the GPUs' ready state was not set")
        self._gate = record
        switches = f" and {record.switches} NVSwitch(es)" if record.switches else ""
        return StartCheck(
            "gpu.ready-gate", True,
            f"{record.gpus} GPU(s){switches} attested locally for a fresh nonce (chain to NVIDIA's root, "
            "signature, nonce, distinct devices" + (", HGX topology" if ppcie else "") + "); ready state set",
        )  # fmt: skip

    def _protected_pcie(self, nvml: Any) -> bool:
        """Whether NVML reports protected-PCIe (multi-GPU) mode, where NVSwitches attest too."""
        settings = self._call(nvml, "c_nvmlSystemConfComputeSettings_v1_t")
        # nvidia-ml-py hands this call's return code back unchecked: check it here.
        code = int(self._call(nvml, "nvmlSystemGetConfComputeSettings", ctypes.byref(settings)))
        if code != _NVML_SUCCESS:
            raise NvmlCallError("nvmlSystemGetConfComputeSettings", "NVMLError", code, "", None)
        return int(settings.multiGpuMode) == _MULTIGPU_PROTECTED_PCIE

    # Evidence ---------------------------------------------------------------------------------

    def evidence(self, nonce: bytes) -> NvidiaPayload:
        """Evidence from every GPU for this 32-byte nonce; raises a `TrustRootError` otherwise."""
        nonce = check_nonce(nonce)
        with self._session() as nvml:
            return self._collect(nvml, nonce, protected_pcie=self._protected_pcie(nvml))

    def _collect(self, nvml: Any, nonce: bytes, *, protected_pcie: bool = False) -> NvidiaPayload:
        state = self._call(nvml, "nvmlSystemGetConfComputeState")
        if int(state.ccFeature) != _CC_FEATURE_ENABLED:
            # Without CC the driver answers the report call with an opaque NVMLError_Unknown.
            raise GpuNotConfidentialError(
                "confidential computing is off (NVML ccFeature 0): the GPUs cannot produce evidence"
            )
        count = int(self._call(nvml, "nvmlDeviceGetCount"))
        if count == 0:
            raise GpuEvidenceError("no NVIDIA GPU found")
        entries = tuple(self._entry(nvml, gpu, nonce) for gpu in range(count))
        arches = {entry.arch for entry in entries}
        if len(arches) != 1:
            raise GpuEvidenceError(f"GPUs of different architectures ({', '.join(sorted(arches))})")
        payload = NvidiaPayload(nonce=nonce, entries=entries, arch=entries[0].arch)
        if not protected_pcie:
            return payload
        if self._switches is None:
            raise GpuEvidenceError("the GPUs are in protected-PCIe mode but nothing gives NVSwitch evidence")
        return with_switches(payload, self._switches.evidence(nonce))

    def _entry(self, nvml: Any, gpu: int, nonce: bytes) -> GpuEvidenceEntry:
        handle = self._call(nvml, "nvmlDeviceGetHandleByIndex", gpu, gpu=gpu)
        arch_code = int(self._call(nvml, "nvmlDeviceGetArchitecture", handle, gpu=gpu))
        arch = NRAS_ARCH.get(arch_code)
        if arch is None:
            raise GpuEvidenceError(f"GPU {gpu}: architecture {arch_code} has no confidential computing")

        report = self._call(nvml, "nvmlDeviceGetConfComputeGpuAttestationReport", handle, nonce, gpu=gpu)
        evidence = _sized(
            report.attestationReport, int(report.attestationReportSize), "attestation report", gpu
        )
        certificate = self._call(nvml, "nvmlDeviceGetConfComputeGpuCertificate", handle, gpu=gpu)
        # attestationCertChain is the chain of the key that signs the attestation report (PEM,
        # leaf first); certChain is another chain that NRAS does not take.
        chain = _sized(
            certificate.attestationCertChain,
            int(certificate.attestationCertChainSize),
            "attestation certificate chain",
            gpu,
        ).rstrip(b"\x00")

        try:
            parsed = parse_gpu_evidence(evidence)
            certificates = decode_certificate_chain(chain) if _PEM_BEGIN in chain else []
        except GpuAttestationError as exc:
            raise GpuEvidenceError(f"GPU {gpu}: {exc}") from None
        if parsed.request_nonce != nonce:
            raise GpuEvidenceError(
                f"GPU {gpu}: the attestation report answers nonce {parsed.request_nonce.hex()}, "
                f"not the requested {nonce.hex()}"
            )
        if not certificates:
            raise GpuEvidenceError(f"GPU {gpu}: the attestation certificate chain holds no PEM certificate")
        return GpuEvidenceEntry(evidence=evidence, certificate_chain_pem=chain, arch=arch)
