"""The GPU providers: the real NVML code against a faithful pynvml stand-in, and the simulator."""

from __future__ import annotations

import ctypes
import inspect
import sys
from collections.abc import Callable
from typing import Any

import pytest

from fakes import nvml as fake_nvml
from fakes.nvml import FakeGpu, FakeNvml
from tee_inference.attestation.nvidia_certs import decode_certificate_chain, verify_certificate_chain
from tee_inference.attestation.nvidia_payload import NvidiaPayload
from tee_inference.attestation.nvidia_simulated import SimulatedGpu
from tee_inference.attestation.nvidia_spdm import verify_evidence_nonce, verify_evidence_signature
from tee_inference.exceptions import TrustRootError
from tee_inference.tee import GpuProvider, StartCheck
from tee_inference.tee.gpu_nvml import (
    GpuEvidenceError,
    GpuNotConfidentialError,
    NvmlCallError,
    NvmlGpuProvider,
    NvmlUnavailableError,
)
from tee_inference.tee.gpu_simulated import SimulatedGpuProvider

NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")


@pytest.fixture(scope="module")
def sims() -> list[SimulatedGpu]:
    return [SimulatedGpu(bytes([index]) * 32) for index in range(1, 4)]


@pytest.fixture
def make(sims: list[SimulatedGpu]) -> Callable[..., tuple[NvmlGpuProvider, FakeNvml]]:
    def build(count: int = 1, **state: Any) -> tuple[NvmlGpuProvider, FakeNvml]:
        nvml = FakeNvml([FakeGpu(sim) for sim in sims[:count]], **state)
        return NvmlGpuProvider(nvml=nvml), nvml

    return build


def failures(results: list[StartCheck]) -> list[str]:
    return [r.detail for r in results if not r.ok]


def check_entry_against(payload: NvidiaPayload, sims: list[SimulatedGpu], nonce: bytes) -> None:
    """What a verifier does with each entry: freshness, signature, chain to the (simulated) root."""
    assert payload.nonce == nonce
    assert len(payload.entries) == len(sims)
    for entry, sim in zip(payload.entries, sims, strict=True):
        evidence = entry.parse()
        verify_evidence_nonce(evidence, nonce)
        chain = decode_certificate_chain(entry.certificate_chain_pem)
        verify_certificate_chain(chain, sim.root_certificate)
        verify_evidence_signature(evidence, chain[0])
        assert entry.arch == "HOPPER"


# NVML, confidential computing on --------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3])
def test_cc_on_evidence_from_every_gpu(make: Any, sims: list[SimulatedGpu], count: int) -> None:
    provider, nvml = make(count)
    payload = provider.evidence(NONCE)

    check_entry_against(payload, sims[:count], NONCE)
    assert payload.arch == "HOPPER"
    # The NRAS form survives the trip through SPEC §3's JSON string.
    assert NvidiaPayload.from_json(payload.to_json()) == payload
    assert nvml.refcount == 0, "every nvmlInit is matched by nvmlShutdown"
    assert nvml.calls.count("nvmlDeviceGetConfComputeGpuAttestationReport") == count


def test_cc_on_all_checks_pass(make: Any) -> None:
    provider, nvml = make(2)
    results = provider.check()

    assert failures(results) == []
    names = [r.name for r in results]
    assert names[0] == "nvml" and results[0].detail == "NVML 13.580.159.04, driver 580.159.04"
    for gpu in (0, 1):
        assert {f"gpu{gpu}.cc", f"gpu{gpu}.devtools", f"gpu{gpu}.ready"} <= set(names)
    assert "gpu.evidence" in names, "the start check fetches real evidence, not just the state"
    assert all("\n" not in r.detail for r in results)
    assert nvml.refcount == 0


def test_blackwell_arch_is_named(make: Any, sims: list[SimulatedGpu]) -> None:
    nvml = FakeNvml([FakeGpu(sims[0], name="NVIDIA B200", arch=fake_nvml.NVML_DEVICE_ARCH_BLACKWELL)])
    payload = NvmlGpuProvider(nvml=nvml).evidence(NONCE)
    assert payload.arch == payload.entries[0].arch == "BLACKWELL"


# NVML, the states that must refuse --------------------------------------------------------------


def test_cc_off_refuses(make: Any) -> None:
    # What the lent H100 reported: environment 0, ccFeature 0, devtools 0, ready 0.
    provider, nvml = make(1, environment=0, cc_feature=0, ready_state=0, cpu_caps=0)
    problems = failures(provider.check())

    assert "GPU 0: confidential computing is off" in problems
    assert "confidential-computing environment is UNAVAILABLE, not PROD" in problems
    assert any(p.startswith("GPU 0: not ready") for p in problems)
    assert "nvmlDeviceGetConfComputeGpuAttestationReport" not in nvml.calls  # not once the state says no
    with pytest.raises(GpuNotConfidentialError, match="confidential computing is off"):
        provider.evidence(NONCE)
    assert "nvmlDeviceGetConfComputeGpuAttestationReport" not in nvml.calls
    assert nvml.refcount == 0


def test_cc_off_fake_answers_like_the_h100(make: Any) -> None:
    """The stand-in itself: with CC off the report call raises NVMLError_Unknown (999)."""
    _, nvml = make(1, cc_feature=0)
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(fake_nvml.NVMLError_Unknown) as caught:  # type: ignore[attr-defined]
        nvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, NONCE)
    assert caught.value.value == 999 and str(caught.value) == "Unknown Error"
    assert caught.value == fake_nvml.NVMLError(999)
    nvml.nvmlShutdown()


def test_devtools_on_refuses(make: Any) -> None:
    provider, _ = make(2, devtools_mode=1)
    problems = failures(provider.check())
    assert problems == ["GPU 0: devtools mode is on", "GPU 1: devtools mode is on"]


def test_not_ready_refuses(make: Any) -> None:
    provider, _ = make(1, ready_state=0)
    assert failures(provider.check()) == ["GPU 0: not ready (NVML ready state 0: not accepting work)"]


def test_sim_environment_refuses(make: Any) -> None:
    provider, _ = make(1, environment=1)
    assert failures(provider.check()) == ["confidential-computing environment is SIM, not PROD"]


def test_not_capable_refuses(make: Any) -> None:
    provider, _ = make(1, gpus_caps=0, cpu_caps=0)
    assert failures(provider.check()) == ["GPUs are not confidential-computing capable (CPU TEE: none)"]


def test_no_gpu(make: Any) -> None:
    provider, _ = make(0)
    assert failures(provider.check()) == ["no NVIDIA GPU found"]
    with pytest.raises(GpuEvidenceError, match="no NVIDIA GPU found"):
        provider.evidence(NONCE)


# NVML errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "name"), [(9, "NVMLError_DriverNotLoaded"), (12, "NVMLError_LibraryNotFound")]
)
def test_nvml_init_failure(make: Any, code: int, name: str) -> None:
    provider, nvml = make(1, fail={"nvmlInit": code})
    results = provider.check()

    assert len(results) == 1 and results[0].name == "nvml" and not results[0].ok
    assert f"NVML did not start: nvmlInit failed: {name} ({code})" in results[0].detail
    with pytest.raises(NvmlUnavailableError, match=name):
        provider.evidence(NONCE)
    assert nvml.refcount == 0 and "nvmlShutdown" not in nvml.calls


def test_attestation_report_unknown_error(make: Any) -> None:
    provider, nvml = make(2, fail={"nvmlDeviceGetConfComputeGpuAttestationReport": 999})
    with pytest.raises(NvmlCallError) as caught:
        provider.evidence(NONCE)

    error = caught.value
    assert isinstance(error, TrustRootError)
    assert (error.error_name, error.code, error.gpu) == ("NVMLError_Unknown", 999, 0)
    assert str(error) == (
        "GPU 0: nvmlDeviceGetConfComputeGpuAttestationReport failed: NVMLError_Unknown (999): Unknown Error"
    )
    assert error.__cause__ is None and error.__suppress_context__  # no pynvml traceback to leak
    assert nvml.refcount == 0, "the session is shut down after a failed call"
    assert failures(provider.check()) == [str(error)]


def test_certificate_error(make: Any) -> None:
    provider, _ = make(1, fail={"nvmlDeviceGetConfComputeGpuCertificate": 3})
    with pytest.raises(NvmlCallError, match=r"GpuCertificate failed: NVMLError_NotSupported \(3\)"):
        provider.evidence(NONCE)


def test_error_text_that_cannot_be_read(make: Any) -> None:
    # pynvml asks the library for the text of codes it does not know; that may fail too.
    class Unreadable(fake_nvml.NVMLError):
        _code = 4242

        def __str__(self) -> str:
            raise fake_nvml.NVMLError(1)

    provider, nvml = make(1)

    def broken(handle: Any, nonce: Any) -> None:
        raise Unreadable()

    nvml.nvmlDeviceGetConfComputeGpuAttestationReport = broken
    with pytest.raises(NvmlCallError, match=r"failed: Unreadable \(4242\)$"):
        provider.evidence(NONCE)


def test_evidence_for_another_nonce_is_refused(make: Any) -> None:
    provider, nvml = make(1)
    nvml.gpus[0].answer_nonce = bytes(32)
    with pytest.raises(GpuEvidenceError, match="answers nonce 0000"):
        provider.evidence(NONCE)
    assert failures(provider.check())[0].startswith("GPU 0: the attestation report answers nonce")


def test_architecture_without_cc(make: Any, sims: list[SimulatedGpu]) -> None:
    nvml = FakeNvml([FakeGpu(sims[0], name="NVIDIA A100", arch=fake_nvml.NVML_DEVICE_ARCH_AMPERE)])
    with pytest.raises(GpuEvidenceError, match="GPU 0: architecture 7 has no confidential computing"):
        NvmlGpuProvider(nvml=nvml).evidence(NONCE)


@pytest.mark.parametrize("bad", [b"", NONCE[:31], NONCE + b"\x00", NONCE.hex()])
def test_nonce_must_be_32_bytes(make: Any, bad: Any) -> None:
    provider, nvml = make(1)
    for p in (provider, SimulatedGpuProvider()):
        with pytest.raises(ValueError, match="nonce must be 32 bytes"):
            p.evidence(bad)
    assert nvml.calls == [], "a bad nonce is refused before NVML is touched"


def test_fake_rejects_wrong_nonce_length_like_ctypes(make: Any) -> None:
    _, nvml = make(1)
    nvml.nvmlInit()
    with pytest.raises(TypeError):
        nvml.nvmlDeviceGetConfComputeGpuAttestationReport(nvml.nvmlDeviceGetHandleByIndex(0), NONCE[:16])
    nvml.nvmlShutdown()


def test_nvidia_ml_py_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    provider = NvmlGpuProvider()
    results = provider.check()
    assert len(results) == 1 and not results[0].ok
    assert results[0].detail.startswith("nvidia-ml-py is not installed")
    with pytest.raises(NvmlUnavailableError, match="nvidia-ml-py is not installed"):
        provider.evidence(NONCE)


def test_providers_are_gpu_providers(make: Any) -> None:
    provider, _ = make(1)
    providers: list[GpuProvider] = [provider, SimulatedGpuProvider()]
    assert [(p.name, p.simulated) for p in providers] == [("nvml", False), ("simulated", True)]


# The stand-in against the real library ---------------------------------------------------------


def test_fake_matches_nvidia_ml_py() -> None:
    real = pytest.importorskip("pynvml")

    def layout(struct: type[ctypes.Structure]) -> list[tuple[str, int]]:
        return [(name, ctypes.sizeof(kind)) for name, kind in struct._fields_]  # type: ignore[misc]

    for struct in (
        "c_nvmlConfComputeSystemState_t",
        "c_nvmlConfComputeSystemCaps_t",
        "c_nvmlConfComputeGpuCertificate_t",
        "c_nvmlConfComputeGpuAttestationReport_t",
        "c_nvmlSystemConfComputeSettings_v1_t",
    ):
        assert layout(getattr(fake_nvml, struct)) == layout(getattr(real, struct)), struct
    assert fake_nvml.nvmlSystemConfComputeSettings_v1 == real.nvmlSystemConfComputeSettings_v1
    for name in dir(fake_nvml):
        if name.startswith("NVML_"):
            assert getattr(fake_nvml, name) == getattr(real, name), name
    for code, class_name in fake_nvml.ERROR_CLASSES.items():
        error = real.NVMLError(code)
        assert type(error).__name__ == class_name and error.value == code
        assert type(fake_nvml.NVMLError(code)).__name__ == class_name
    fake = FakeNvml([])
    for name in vars(FakeNvml):
        if name.startswith("nvml"):
            ours = list(inspect.signature(getattr(fake, name)).parameters)
            theirs = list(inspect.signature(getattr(real, name)).parameters)
            assert ours == theirs, name


# Simulated --------------------------------------------------------------------------------------


def test_simulated_provider() -> None:
    provider = SimulatedGpuProvider(bytes(32), gpu_count=2)
    assert provider.check() == [StartCheck("gpu", True, "simulated")]
    payload = provider.evidence(NONCE)
    check_entry_against(payload, list(provider.gpus), NONCE)
    # Distinct devices, and a seed fixes everything.
    assert payload.entries[0].certificate_chain_pem != payload.entries[1].certificate_chain_pem
    assert SimulatedGpuProvider(bytes(32), gpu_count=2).evidence(NONCE) == payload
    assert SimulatedGpuProvider().evidence(NONCE) != SimulatedGpuProvider().evidence(NONCE)


def test_simulated_provider_arguments() -> None:
    with pytest.raises(ValueError, match="gpu_count"):
        SimulatedGpuProvider(gpu_count=0)
    with pytest.raises(ValueError, match="seed must be 32 bytes"):
        SimulatedGpuProvider(b"short")
