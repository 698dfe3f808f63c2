"""The `--tee tdx` boot on faithful fakes: the real configfs-tsm, TDX guest and NVML code
runs against fakes of the kernel and the driver, so the whole fail-closed start, the RTMR3
extensions and the report are exercised as on a TDX host with an H100 in CC mode."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import anyio
import pytest

from fakes.configfs_tsm import FakeConfigfsTsm
from fakes.nvml import FakeGpu, FakeNvml
from fakes.tdx_guest import FakeTdxGuestDevice
from tee_inference.attestation.eventlog import EVENT_KEYSET, EVENT_MODEL_WEIGHTS, load_event_log, replay
from tee_inference.attestation.nvidia_simulated import SimulatedGpu
from tee_inference.attestation.tdx_quote import parse_quote
from tee_inference.boot import StartRefused, TrustRoots, boot
from tee_inference.config import ServerConfig
from tee_inference.measure import measure_model
from tee_inference.tee.configfs_tsm import ConfigfsTsm
from tee_inference.tee.gpu_nvml import NvmlGpuProvider
from tee_inference.tee.tdx import ConfigfsTdxProvider
from tee_inference.tee.tdx_guest import TdxGuest

MODEL = "fake-model"


@pytest.fixture
def host(tmp_path: Path) -> dict:
    """A TDX guest with one H100 in CC mode, as fakes of the kernel and driver interfaces."""
    tsm = FakeConfigfsTsm(tmp_path / "tsm")
    device = FakeTdxGuestDevice(tmp_path / "device")
    nvml = FakeNvml([FakeGpu(SimulatedGpu(bytes(32)))])
    roots = TrustRoots(
        tdx=ConfigfsTdxProvider(ConfigfsTsm(tsm.root, fs=tsm), TdxGuest(device.device, device.measurements, io=device),
                                ccel_path=tmp_path / "no-ccel"),
        gpu=NvmlGpuProvider(nvml=nvml),
    )  # fmt: skip
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(secrets.token_bytes(4096))
    return {"tsm": tsm, "device": device, "nvml": nvml, "roots": roots, "model": model}


def _config(host: dict, **extra: object) -> ServerConfig:
    return ServerConfig.build(
        tee="tdx", tls="self-signed", served_models=(MODEL,), model_dir=host["model"], **extra
    )


def test_tdx_boot_extends_rtmr3_and_reports(host: dict) -> None:
    root = measure_model(host["model"]).root
    services = boot(_config(host, model_weights_root=root), host["roots"])
    # The kernel's RTMR3 (the fake device's) now holds our three boot events.
    extends = [e for e in host["device"].extends if e[1] == 3]
    assert len(extends) == 3
    nonce = secrets.token_bytes(32)
    report = anyio.run(services.attestation.report, nonce, "ecdsa").to_dict()
    quote = parse_quote(bytes.fromhex(report["intel_quote"]))
    assert quote.td_report.report_data[32:] == nonce
    events = load_event_log(report["event_log"])
    assert replay(events)[3] == host["device"].rtmrs[3]
    names = {e.event: json.loads(e.event_payload) for e in events if e.imr == 3}
    assert names[EVENT_MODEL_WEIGHTS]["root"] == root
    assert names[EVENT_KEYSET]["address"] == services.signer.ecdsa.address
    assert report["info"]["simulated"] is False
    assert report["info"]["tdx_provider"] == host["roots"].tdx.name
    assert json.loads(report["nvidia_payload"])["nonce"] == nonce.hex()


def test_tampered_model_refuses_to_start(host: dict) -> None:
    root = measure_model(host["model"]).root
    (host["model"] / "model.safetensors").write_bytes(b"tampered weights")
    with pytest.raises(StartRefused, match="measures"):
        boot(_config(host, model_weights_root=root), host["roots"])
    assert not [e for e in host["device"].extends if e[1] == 3]  # nothing measured, nothing served


def test_gpu_cc_off_refuses_to_start(host: dict) -> None:
    host["nvml"].cc_feature = 0
    with pytest.raises(StartRefused) as refused:
        boot(_config(host), host["roots"])
    assert "GPU 0: confidential computing is off" in " ".join(refused.value.reasons)


def test_configfs_missing_refuses_to_start(host: dict) -> None:
    host["tsm"].remove_root()
    with pytest.raises(StartRefused) as refused:
        boot(_config(host), host["roots"])
    assert any("configfs-tsm" in reason for reason in refused.value.reasons)


def test_wrong_tsm_provider_refuses_to_start(host: dict) -> None:
    host["tsm"].provider = "sev_guest"
    with pytest.raises(StartRefused):
        boot(_config(host), host["roots"])
