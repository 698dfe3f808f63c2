"""The attestation report (SPEC §3) from the simulated trust roots, and the fail-closed start."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from support.servers import running
from tee_inference.attestation.eventlog import (
    EVENT_KEYSET,
    EVENT_MODEL_WEIGHTS,
    Event,
    load_event_log,
    replay,
)
from tee_inference.attestation.nvidia_payload import NvidiaPayload
from tee_inference.attestation.nvidia_spdm import parse_gpu_evidence, verify_evidence_signature
from tee_inference.attestation.report_data import report_data_for
from tee_inference.attestation.tdx_quote import load_pck_chain, parse_quote, verify_quote_ecdsa
from tee_inference.boot import StartRefused, boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.middleware import SigningMiddleware
from tee_inference.reports import AttestationService, ReportBusy, parse_nonce
from tee_inference.services import Services
from tee_inference.tee.gpu_simulated import SimulatedGpuProvider
from tee_inference.tee.tdx_simulated import SimulatedTdxProvider

MODEL = "fake-model"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Services]]:
    services = boot(ServerConfig.build(served_models=(MODEL,)))
    with running(SigningMiddleware(FakeEngine(MODEL), services=services)) as url:
        yield url, services


def _check_report(report: dict[str, Any], nonce: bytes, algo: str, services: Services) -> None:
    quote = parse_quote(bytes.fromhex(report["intel_quote"]))
    signer = services.signer
    key = bytes.fromhex(signer.ecdsa.address[2:]) if algo == "ecdsa" else signer.ed25519.public_key
    assert quote.td_report.report_data == report_data_for(algo, key, nonce)
    assert report["request_nonce"] == nonce.hex()
    assert report["signing_address"] == signer.ecdsa.address
    assert report["signing_algo"] == algo
    expected_pub = signer.ecdsa.public_key if algo == "ecdsa" else signer.ed25519.public_key
    assert report["signing_public_key"] == expected_pub.hex()
    # The simulated quote is a real ECDSA structure, checkable against its own root.
    verify_quote_ecdsa(quote, load_pck_chain(quote.pck_chain_pem)[-1])
    events = load_event_log(report["event_log"])
    assert replay(events) == quote.td_report.rtmrs
    payload = NvidiaPayload.from_json(report["nvidia_payload"])
    assert payload.nonce == nonce
    for entry in payload.entries:
        evidence = parse_gpu_evidence(entry.evidence)
        assert evidence.request_nonce == nonce
        verify_evidence_signature(evidence, entry.certificates()[0])
    assert report["info"]["simulated"] is True
    assert report["all_attestations"][0]["intel_quote"] == report["intel_quote"]


@pytest.mark.parametrize("algo", ["ecdsa", "ed25519"])
def test_report_binds_key_and_nonce(served: tuple[str, Services], algo: str) -> None:
    url, services = served
    nonce = secrets.token_bytes(32)
    r = httpx.get(
        url + "/v1/attestation/report", params={"model": MODEL, "nonce": nonce.hex(), "signing_algo": algo}
    )
    assert r.status_code == 200
    _check_report(r.json(), nonce, algo, services)


def test_event_log_records_key_and_weights(served: tuple[str, Services]) -> None:
    url, services = served
    report = httpx.get(url + "/v1/attestation/report").json()
    events = {e.event: e for e in load_event_log(report["event_log"]) if e.imr == 3}
    key_event = json.loads(events[EVENT_KEYSET].event_payload)
    assert key_event["address"] == services.signer.ecdsa.address
    assert key_event["ed25519_public_key"] == services.signer.ed25519.public_key.hex()
    assert EVENT_MODEL_WEIGHTS in events


def test_bad_nonce_and_algo_are_400(served: tuple[str, Services]) -> None:
    url, _ = served
    for nonce in ("xyz", "ab" * 31, "ab" * 33, "zz" * 32, "ab" * 31 + " a"):
        r = httpx.get(url + "/v1/attestation/report", params={"nonce": nonce})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "nonce"
    r = httpx.get(url + "/v1/attestation/report", params={"signing_algo": "rsa"})
    assert r.status_code == 400
    r = httpx.get(url + "/v1/attestation/report", params={"model": "other"})
    assert r.json()["error"]["code"] == "model_not_confidential"


def test_server_nonce_reports_are_cached_briefly_and_caller_nonces_never_shared(
    served: tuple[str, Services],
) -> None:
    url, _ = served
    a = httpx.get(url + "/v1/attestation/report").json()
    b = httpx.get(url + "/v1/attestation/report").json()
    assert a["request_nonce"] == b["request_nonce"]  # server-chosen nonce: reused within the TTL
    n1, n2 = secrets.token_hex(32), secrets.token_hex(32)
    r1 = httpx.get(url + "/v1/attestation/report", params={"nonce": n1}).json()
    r2 = httpx.get(url + "/v1/attestation/report", params={"nonce": n2}).json()
    assert (r1["request_nonce"], r2["request_nonce"]) == (n1, n2)
    assert r1["intel_quote"] != r2["intel_quote"]


class _CountingTdx(SimulatedTdxProvider):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.gate = threading.Event()

    def get_quote(self, report_data: bytes) -> bytes:
        self.calls += 1
        self.gate.wait(5)
        return super().get_quote(report_data)


def _service(tdx: SimulatedTdxProvider, **kwargs: Any) -> AttestationService:
    services = boot(ServerConfig.build(served_models=(MODEL,)))
    return AttestationService(tdx=tdx, gpu=SimulatedGpuProvider(), keys=services.keys, info={}, **kwargs)


def test_concurrent_identical_requests_share_one_collection() -> None:
    tdx = _CountingTdx()
    service = _service(tdx)
    nonce = secrets.token_bytes(32)
    results: list[dict[str, Any]] = []

    async def scenario() -> None:
        async def one() -> None:
            results.append(await service.report(nonce, "ecdsa"))

        async with anyio.create_task_group() as tasks:
            for _ in range(8):
                tasks.start_soon(one)
            await anyio.sleep(0.2)
            tdx.gate.set()

    anyio.run(scenario)
    assert tdx.calls == 1
    assert len(results) == 8
    assert all(r is results[0] for r in results)


def test_distinct_pending_reports_are_bounded() -> None:
    tdx = _CountingTdx()
    service = _service(tdx, max_pending=2)

    async def scenario() -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(service.report, secrets.token_bytes(32), "ecdsa")
            tasks.start_soon(service.report, secrets.token_bytes(32), "ecdsa")
            await anyio.sleep(0.1)
            with pytest.raises(ReportBusy):
                await service.report(secrets.token_bytes(32), "ecdsa")
            tdx.gate.set()

    anyio.run(scenario)


def test_collection_runs_off_the_event_loop() -> None:
    tdx = _CountingTdx()
    service = _service(tdx)
    ticks = 0

    async def scenario() -> None:
        nonlocal ticks

        async def ticker() -> None:
            nonlocal ticks
            while not tdx.gate.is_set():
                ticks += 1
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ticker)
            tasks.start_soon(service.report, secrets.token_bytes(32), "ed25519")
            await anyio.sleep(0.3)
            tdx.gate.set()

    anyio.run(scenario)
    assert ticks > 10  # the loop kept running while the quote was being taken


def test_parse_nonce() -> None:
    assert parse_nonce(None) is None
    assert parse_nonce("AB" * 32) == b"\xab" * 32
    with pytest.raises(ValueError, match="64 hex"):
        parse_nonce("ab" * 16)


def test_model_weights_are_measured_and_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights" * 1000)
    services = boot(ServerConfig.build(served_models=(MODEL,), model_dir=tmp_path))
    root = services.info["model_weights_root"]
    assert root is not None
    event = next(e for e in services.attestation.tdx.event_log() if e.event == EVENT_MODEL_WEIGHTS)
    assert json.loads(event.event_payload)["root"] == root
    assert services.attestation.info["model_weights_root"] == root
    boot(ServerConfig.build(served_models=(MODEL,), model_dir=tmp_path, model_weights_root=root))
    (tmp_path / "model.safetensors").write_bytes(b"weights" * 999 + b"tampered")
    with pytest.raises(StartRefused, match="measures"):
        boot(ServerConfig.build(served_models=(MODEL,), model_dir=tmp_path, model_weights_root=root))


def test_serve_tee_tdx_refuses_here_and_names_each_missing_root() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tee_inference", "serve", "--tee", "tdx", "--engine", "fake", "--port", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    lines = [
        line for line in result.stderr.splitlines() if line.startswith("tee-inference: refusing to start")
    ]
    text = "\n".join(lines)
    assert "configfs-tsm" in text
    assert "/dev/tdx_guest" in text
    assert "nvml" in text.lower() or "nvidia" in text.lower()
    assert "Traceback" not in result.stderr


def test_file_key_refused_with_tdx(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = tmp_path / "key"
    key.write_text("ab" * 32)
    result = subprocess.run(
        [sys.executable, "-m", "tee_inference", "serve", "--tee", "tdx", "--engine", "fake", "--key-source", "file",
         "--key-file", str(key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "development only" in result.stderr


def test_event_type_sanity() -> None:
    # Our runtime events follow dstack's digest convention so dstack verifiers read them.
    event = SimulatedTdxProvider().emit_event("x", b"y")
    assert isinstance(event, Event)
    assert event.imr == 3
    prefix = event.event_type.to_bytes(4, "little") + b":x:y"
    assert event.digest == hashlib.sha384(prefix).digest()
