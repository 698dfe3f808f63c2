"""A stand-in for the ``pynvml`` module of nvidia-ml-py, backed by `SimulatedGpu`.

It has the parts of nvidia-ml-py that the GPU provider touches, in the same shapes: the same
function names and parameters, the same ctypes structures (field names, types and array sizes
of nvidia-ml-py 13.x), plain ``int``/``str`` where the library returns those, device handles
that are ctypes pointers, and the ``NVMLError`` family, where ``NVMLError(999)`` is an
``NVMLError_Unknown`` whose ``value`` is 999. Like the library it refuses calls before
``nvmlInit`` (``NVMLError_Uninitialized``) and counts init/shutdown references, and like a real
H100 with confidential computing off it answers the report and certificate calls with
``NVMLError_Unknown``. ``test_gpu_provider`` compares the structures and error classes with
the real library when it is installed.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, c_uint, c_uint8
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

from tee_inference.attestation.nvidia_simulated import SimulatedGpu

NVML_SUCCESS = 0
# nvmlReturn_t codes and the class names nvidia-ml-py generates for them.
ERROR_CLASSES = {
    1: "NVMLError_Uninitialized",
    2: "NVMLError_InvalidArgument",
    3: "NVMLError_NotSupported",
    4: "NVMLError_NoPermission",
    5: "NVMLError_AlreadyInitialized",
    6: "NVMLError_NotFound",
    7: "NVMLError_InsufficientSize",
    9: "NVMLError_DriverNotLoaded",
    10: "NVMLError_Timeout",
    12: "NVMLError_LibraryNotFound",
    13: "NVMLError_FunctionNotFound",
    15: "NVMLError_GpuIsLost",
    18: "NVMLError_LibRmVersionMismatch",
    27: "NVMLError_NotReady",
    999: "NVMLError_Unknown",
}
_ERROR_TEXT = {
    1: "Uninitialized",
    2: "Invalid Argument",
    3: "Not Supported",
    4: "Insufficient Permissions",
    5: "Already Initialized",
    6: "Not Found",
    7: "Insufficient Size",
    9: "Driver Not Loaded",
    10: "Timeout",
    12: "NVML Shared Library Not Found",
    13: "Function Not Found",
    15: "GPU is lost",
    18: "RM has detected an NVML/RM version mismatch.",
    999: "Unknown Error",
}

NVML_DEVICE_ARCH_AMPERE = 7
NVML_DEVICE_ARCH_HOPPER = 9
NVML_DEVICE_ARCH_BLACKWELL = 10
NVML_CC_SYSTEM_ENVIRONMENT_UNAVAILABLE = 0
NVML_CC_SYSTEM_ENVIRONMENT_SIM = 1
NVML_CC_SYSTEM_ENVIRONMENT_PROD = 2
NVML_CC_SYSTEM_FEATURE_DISABLED = 0
NVML_CC_SYSTEM_FEATURE_ENABLED = 1
NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF = 0
NVML_CC_SYSTEM_DEVTOOLS_MODE_ON = 1
NVML_CC_ACCEPTING_CLIENT_REQUESTS_FALSE = 0
NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE = 1
NVML_CC_SYSTEM_GPUS_CC_NOT_CAPABLE = 0
NVML_CC_SYSTEM_GPUS_CC_CAPABLE = 1
NVML_CC_SYSTEM_CPU_CAPS_NONE = 0
NVML_CC_SYSTEM_CPU_CAPS_INTEL_TDX = 2
NVML_CC_SYSTEM_MULTIGPU_NONE = 0
NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE = 1
NVML_GPU_CERT_CHAIN_SIZE = 0x1000
NVML_GPU_ATTESTATION_CERT_CHAIN_SIZE = 0x1400
NVML_CC_GPU_CEC_NONCE_SIZE = 0x20
NVML_CC_GPU_ATTESTATION_REPORT_SIZE = 0x2000
NVML_CC_GPU_CEC_ATTESTATION_REPORT_SIZE = 0x1000


class NVMLError(Exception):
    """``NVMLError(code)`` builds the subclass for that code; each subclass knows its own code."""

    _by_code: ClassVar[dict[int, type[NVMLError]]] = {}
    _code: ClassVar[int | None] = None
    value: int

    def __new__(cls, value: int | None = None) -> NVMLError:
        if cls is NVMLError and value in NVMLError._by_code:
            cls = NVMLError._by_code[value]
        obj = Exception.__new__(cls)
        obj.value = cls._code if cls._code is not None else int(value or 0)
        return obj

    def __init__(self, value: int | None = None) -> None:
        # nvidia-ml-py's errors carry no args; only `value`.
        super().__init__()

    def __str__(self) -> str:
        return _ERROR_TEXT.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    __hash__ = None  # type: ignore[assignment]  # as in nvidia-ml-py, which defines __eq__ only


for _code, _name in ERROR_CLASSES.items():
    _cls = type(_name, (NVMLError,), {"_code": _code})
    NVMLError._by_code[_code] = _cls
    globals()[_name] = _cls


class c_nvmlConfComputeSystemState_t(Structure):
    _fields_ = [("environment", c_uint), ("ccFeature", c_uint), ("devToolsMode", c_uint)]


nvmlSystemConfComputeSettings_v1 = 0x1000014


class c_nvmlSystemConfComputeSettings_v1_t(Structure):
    _fields_ = [
        ("version", c_uint),
        ("environment", c_uint),
        ("ccFeature", c_uint),
        ("devToolsMode", c_uint),
        ("multiGpuMode", c_uint),
    ]

    def __init__(self) -> None:
        super().__init__(version=nvmlSystemConfComputeSettings_v1)


class c_nvmlConfComputeSystemCaps_t(Structure):
    _fields_ = [("cpuCaps", c_uint), ("gpusCaps", c_uint)]


class c_nvmlConfComputeGpuCertificate_t(Structure):
    _fields_ = [
        ("certChainSize", c_uint),
        ("attestationCertChainSize", c_uint),
        ("certChain", c_uint8 * NVML_GPU_CERT_CHAIN_SIZE),
        ("attestationCertChain", c_uint8 * NVML_GPU_ATTESTATION_CERT_CHAIN_SIZE),
    ]


class c_nvmlConfComputeGpuAttestationReport_t(Structure):
    _fields_ = [
        ("isCecAttestationReportPresent", c_uint),
        ("attestationReportSize", c_uint),
        ("cecAttestationReportSize", c_uint),
        ("nonce", c_uint8 * NVML_CC_GPU_CEC_NONCE_SIZE),
        ("attestationReport", c_uint8 * NVML_CC_GPU_ATTESTATION_REPORT_SIZE),
        ("cecAttestationReport", c_uint8 * NVML_CC_GPU_CEC_ATTESTATION_REPORT_SIZE),
    ]


class struct_c_nvmlDevice_t(Structure):
    pass  # opaque, as in the library


c_nvmlDevice_t = POINTER(struct_c_nvmlDevice_t)


@dataclass
class FakeGpu:
    """One device: its simulated attestation identity, name and NVML architecture code."""

    sim: SimulatedGpu
    name: str = "NVIDIA H100 80GB HBM3"
    arch: int = NVML_DEVICE_ARCH_HOPPER
    # What a confused driver (or a fault) might put in the report: evidence for another nonce.
    answer_nonce: bytes | None = None
    # certChain holds a different chain, so code that reads the wrong field fails to verify.
    other_chain_pem: bytes = field(default_factory=lambda: SimulatedGpu(b"\xff" * 32).certificate_chain_pem())
    # A GPU whose report is signed by another device's key than its chain's leaf: it answers every
    # call, but fails local attestation (a swapped board, a forged report).
    signer: SimulatedGpu | None = None


def _fill(array: Any, data: bytes) -> int:
    if len(data) > len(array):
        raise NVMLError(7)  # NVML_ERROR_INSUFFICIENT_SIZE
    ctypes.memmove(array, data, len(data))
    return len(data)


class FakeNvml(ModuleType):
    """A ``pynvml`` module object; the system state is plain attributes a test may change.

    ``fail`` maps a function name to an NVML error code that call raises (``nvmlInit`` too).
    """

    NVMLError = NVMLError
    NVML_SUCCESS = NVML_SUCCESS

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        environment: int = NVML_CC_SYSTEM_ENVIRONMENT_PROD,
        cc_feature: int = NVML_CC_SYSTEM_FEATURE_ENABLED,
        devtools_mode: int = NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF,
        ready_state: int = NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE,
        multi_gpu_mode: int = NVML_CC_SYSTEM_MULTIGPU_NONE,
        gpus_caps: int = NVML_CC_SYSTEM_GPUS_CC_CAPABLE,
        cpu_caps: int = NVML_CC_SYSTEM_CPU_CAPS_INTEL_TDX,
        driver_version: str = "580.159.04",
        nvml_version: str = "13.580.159.04",
        fail: dict[str, int] | None = None,
    ) -> None:
        super().__init__("pynvml")
        for name, value in globals().items():
            if name.startswith(("NVML_", "NVMLError_", "c_nvml", "struct_c_nvml", "nvmlSystemConfCompute")):
                setattr(self, name, value)
        self.gpus = gpus
        self.environment = environment
        self.cc_feature = cc_feature
        self.devtools_mode = devtools_mode
        self.ready_state = ready_state
        self.multi_gpu_mode = multi_gpu_mode
        self.ready_sets: list[int] = []  # every nvmlSystemSetConfComputeGpusReadyState, in order
        self.gpus_caps = gpus_caps
        self.cpu_caps = cpu_caps
        self.driver_version = driver_version
        self.nvml_version = nvml_version
        self.fail = dict(fail or {})
        self.refcount = 0
        self.calls: list[str] = []
        self._devices = [struct_c_nvmlDevice_t() for _ in gpus]

    def _enter(self, name: str, *, needs_init: bool = True) -> None:
        self.calls.append(name)
        if needs_init and self.refcount == 0:
            raise NVMLError(1)
        if name in self.fail:
            raise NVMLError(self.fail[name])

    def _gpu(self, handle: Any) -> FakeGpu:
        address = ctypes.addressof(handle.contents)
        for device, gpu in zip(self._devices, self.gpus, strict=True):
            if ctypes.addressof(device) == address:
                return gpu
        raise NVMLError(2)

    def _cc_or_unknown(self) -> None:
        # What an H100 with CC off answered on the lent machine (driver 580.159).
        if self.cc_feature != NVML_CC_SYSTEM_FEATURE_ENABLED:
            raise NVMLError(999)

    def nvmlInit(self) -> None:
        self._enter("nvmlInit", needs_init=False)
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._enter("nvmlSystemGetNVMLVersion")
        return self.nvml_version

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self._devices):
            raise NVMLError(2)
        return ctypes.pointer(self._devices[index])

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._enter("nvmlDeviceGetName")
        return self._gpu(handle).name

    def nvmlDeviceGetArchitecture(self, device: Any) -> int:
        self._enter("nvmlDeviceGetArchitecture")
        return self._gpu(device).arch

    def nvmlSystemGetConfComputeState(self) -> c_nvmlConfComputeSystemState_t:
        self._enter("nvmlSystemGetConfComputeState")
        return c_nvmlConfComputeSystemState_t(self.environment, self.cc_feature, self.devtools_mode)

    def nvmlSystemGetConfComputeCapabilities(self) -> c_nvmlConfComputeSystemCaps_t:
        self._enter("nvmlSystemGetConfComputeCapabilities")
        return c_nvmlConfComputeSystemCaps_t(self.cpu_caps, self.gpus_caps)

    def nvmlSystemGetConfComputeGpusReadyState(self) -> int:
        self._enter("nvmlSystemGetConfComputeGpusReadyState")
        return self.ready_state

    def nvmlSystemSetConfComputeGpusReadyState(self, state: int) -> int:
        self._enter("nvmlSystemSetConfComputeGpusReadyState")
        if state not in (NVML_CC_ACCEPTING_CLIENT_REQUESTS_FALSE, NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE):
            raise NVMLError(2)
        self._cc_or_unknown()
        self.ready_sets.append(state)
        self.ready_state = state
        return NVML_SUCCESS

    def nvmlSystemGetConfComputeSettings(self, settings: Any) -> int:
        # As the library: a pointer (byref) to a versioned struct goes in, and the nvmlReturn_t comes
        # back unchecked (this binding does not raise); a wrong version is NVML_ERROR_ARGUMENT_VERSION_MISMATCH.
        self._enter("nvmlSystemGetConfComputeSettings")
        target = settings._obj
        if target.version != nvmlSystemConfComputeSettings_v1:
            return 25
        target.environment, target.ccFeature = self.environment, self.cc_feature
        target.devToolsMode, target.multiGpuMode = self.devtools_mode, self.multi_gpu_mode
        return NVML_SUCCESS

    def nvmlDeviceGetConfComputeGpuAttestationReport(
        self, device: Any, c_nonce: Any
    ) -> c_nvmlConfComputeGpuAttestationReport_t:
        report = c_nvmlConfComputeGpuAttestationReport_t()
        # As the library: an array of len(c_nonce) goes into a 32-byte field, so any other
        # length is a ctypes TypeError before NVML is reached.
        report.nonce = (c_uint8 * len(c_nonce))(*c_nonce)
        self._enter("nvmlDeviceGetConfComputeGpuAttestationReport")
        gpu = self._gpu(device)
        self._cc_or_unknown()
        evidence = (gpu.signer or gpu.sim).evidence(gpu.answer_nonce or bytes(report.nonce))
        report.attestationReportSize = _fill(report.attestationReport, evidence)
        report.isCecAttestationReportPresent = 0
        return report

    def nvmlDeviceGetConfComputeGpuCertificate(self, device: Any) -> c_nvmlConfComputeGpuCertificate_t:
        self._enter("nvmlDeviceGetConfComputeGpuCertificate")
        gpu = self._gpu(device)
        self._cc_or_unknown()
        cert = c_nvmlConfComputeGpuCertificate_t()
        cert.certChainSize = _fill(cert.certChain, gpu.other_chain_pem[:NVML_GPU_CERT_CHAIN_SIZE])
        cert.attestationCertChainSize = _fill(cert.attestationCertChain, gpu.sim.certificate_chain_pem())
        return cert
