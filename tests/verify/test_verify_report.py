"""Whole-report verification on simulated reports built exactly as the server emits them."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from support.simulated_report import SimulatedNode
from tee_inference.verify import (
    AnyOf,
    MeasurementPolicy,
    Status,
    VerificationPolicy,
    Verifier,
    parse_expected_measurements,
)

NONCE = bytes.fromhex("aa" * 32)
EXPECTED = parse_expected_measurements(json.dumps(SimulatedNode().expected_measurements()), origin="sim.json")
ALLOW = VerificationPolicy.build(expected=[EXPECTED], allow_simulated=True)


@pytest.fixture(scope="module")
def node() -> SimulatedNode:
    return SimulatedNode()


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier.production()


def _failed(result: Any) -> dict[str, str]:
    return {c.name: c.detail for c in result.blocking}


@pytest.mark.parametrize("algo", ["ecdsa", "ed25519"])
def test_simulated_report_passes_only_when_allowed(
    node: SimulatedNode, verifier: Verifier, algo: str
) -> None:
    report = node.report(NONCE, algo)
    refused = verifier.verify_report(report, VerificationPolicy(), nonce=NONCE)
    assert not refused.ok
    assert "--allow-simulated" in _failed(refused)["simulated"]
    assert "--allow-simulated" in _failed(refused)["quote_signature"]
    accepted = verifier.verify_report(json.dumps(report), ALLOW, nonce=NONCE)
    assert accepted.ok, _failed(accepted)
    assert accepted.simulated
    if algo == "ecdsa":
        assert accepted.attested["signing_address"] == node.signer.ecdsa.address
    else:  # an ed25519 quote binds the ed25519 key only: the report's ecdsa address is not attested
        assert accepted.attested["signing_address"] is None
        assert accepted.attested["signing_public_key"] == node.signer.ed25519.public_key.hex()
    names = accepted.names()
    for name in ("quote_structure", "quote_signature", "tcb_status", "td_attributes", "report_data",
                 "event_log_replay", "measurements", "gpu_evidence", "gpu_nonce"):  # fmt: skip
        assert name in names


def test_wrong_nonce_says_which_bytes_differ(node: SimulatedNode, verifier: Verifier) -> None:
    result = verifier.verify_report(node.report(NONCE), ALLOW, nonce=bytes(32))
    failed = _failed(result)
    assert "report answers nonce" in failed["freshness"]
    assert failed["report_data"].startswith("report_data mismatch: nonce (32–63) differs from byte 32")
    assert "gpu_nonce" in failed


def test_report_data_for_another_key_is_named(node: SimulatedNode, verifier: Verifier) -> None:
    bogus = bytes(20) + bytes(12) + NONCE
    report = node.report(NONCE, report_data=bogus)
    failed = _failed(verifier.verify_report(report, ALLOW, nonce=NONCE))
    assert "signing address (bytes 0–19) differs from byte 0" in failed["report_data"]
    assert result_address_not_attested(verifier, report)


def result_address_not_attested(verifier: Verifier, report: dict[str, Any]) -> bool:
    return verifier.verify_report(report, ALLOW, nonce=NONCE).attested["signing_address"] is None


def test_swapped_signing_address_is_caught(node: SimulatedNode, verifier: Verifier) -> None:
    other = SimulatedNode(seed=bytes(range(1, 33)))
    report = node.report(NONCE)
    report["signing_address"] = other.signer.ecdsa.address
    report["signing_public_key"] = other.signer.ecdsa.public_key.hex()
    failed = _failed(verifier.verify_report(report, ALLOW, nonce=NONCE))
    assert "report_data" in failed
    assert "RTMR3 measured key" in failed["keyset_event"]


@pytest.mark.parametrize(
    ("mutate", "check", "message"),
    [
        (lambda r: r["info"].update(model_weights_root="00" * 32), "model_event", "info says"),
        (lambda r: r["info"].update(image_digest="sha256:" + "11" * 32), "image_event", "info says"),
        (lambda r: r["info"].update(simulated=False), "simulated", "mislabels"),
        (lambda r: r.update(signing_public_key="04" + "11" * 64), "signing_key", "not a secp256k1 point"),
        (lambda r: r["event_log"].pop(), "event_log_replay", "RTMR3: quote has"),
        (lambda r: r.update(intel_quote=r["intel_quote"] + "01"), "quote_structure", "padding"),
        (lambda r: r.update(nvidia_payload=None), "gpu_evidence", "no GPU evidence"),
        (lambda r: r.update(request_nonce="zz"), "report_format", "request_nonce"),
    ],
)
def test_each_binding_is_checked(
    node: SimulatedNode, verifier: Verifier, mutate: Any, check: str, message: str
) -> None:
    report = copy.deepcopy(node.report(NONCE))
    mutate(report)
    failed = _failed(verifier.verify_report(report, ALLOW, nonce=NONCE))
    assert check in failed, failed
    assert message in failed[check]


def test_runtime_event_payload_tamper(node: SimulatedNode, verifier: Verifier) -> None:
    report = copy.deepcopy(node.report(NONCE))
    event = next(e for e in report["event_log"] if e["event"] == "tee-inference:model-weights")
    event["event_payload"] = json.dumps({"model": node.model, "root": "00" * 32}).encode().hex()
    failed = _failed(verifier.verify_report(report, ALLOW, nonce=NONCE))
    assert "name or payload was altered" in failed["event_log_replay"]


def test_quote_byte_tamper_anywhere(node: SimulatedNode, verifier: Verifier) -> None:
    report = node.report(NONCE)
    raw = bytes.fromhex(report["intel_quote"])
    for offset in (10, 200, 400, 600, 640, 800, 1200, len(raw) - 40):
        damaged = bytearray(raw)
        damaged[offset] ^= 0x04
        result = verifier.verify_report({**report, "intel_quote": damaged.hex()}, ALLOW, nonce=NONCE)
        assert not result.ok, offset


def test_expected_measurements_pass_and_fail(node: SimulatedNode, verifier: Verifier) -> None:
    good = parse_expected_measurements(json.dumps(node.expected_measurements()), origin="good.json")
    policy = VerificationPolicy.build(expected=[good], allow_simulated=True)
    result = verifier.verify_report(node.report(NONCE), policy, nonce=NONCE)
    assert result.ok, _failed(result)
    assert "mrtd ok" in result.check("measurements").detail
    doc = node.expected_measurements()
    doc["tdx"]["rtmr1"] = ["ab" * 48]
    doc["models"] = {"other-model": {"weights_root": "cd" * 32}}
    bad = parse_expected_measurements(json.dumps(doc), origin="bad.json")
    failed = verifier.verify_report(
        node.report(NONCE), VerificationPolicy.build(expected=[bad], allow_simulated=True), nonce=NONCE
    )
    detail = failed.check("measurements").detail
    assert failed.check("measurements").status is Status.FAIL
    assert "rtmr1 is" in detail and "model 'sim-model' (not in the expected file)" in detail
    either = VerificationPolicy(
        simulated=ALLOW.simulated, measurements=AnyOf(MeasurementPolicy(bad), MeasurementPolicy(good))
    )
    assert verifier.verify_report(node.report(NONCE), either, nonce=NONCE).ok


def test_model_must_be_the_one_asked_for(node: SimulatedNode, verifier: Verifier) -> None:
    result = verifier.verify_report(node.report(NONCE), ALLOW, nonce=NONCE, model="other")
    assert "you asked for 'other'" in _failed(result)["model_event"]


def test_other_nodes_are_verified(node: SimulatedNode, verifier: Verifier) -> None:
    report = node.report(NONCE)
    second = SimulatedNode(seed=bytes(range(2, 34))).report(NONCE)
    report["all_attestations"].append({k: v for k, v in second.items() if k != "all_attestations"})
    assert verifier.verify_report(report, ALLOW, nonce=NONCE).ok
    broken = SimulatedNode(seed=bytes(range(3, 35))).report(bytes(32))  # answered another nonce
    report["all_attestations"].append({k: v for k, v in broken.items() if k != "all_attestations"})
    failed = _failed(verifier.verify_report(report, ALLOW, nonce=NONCE))
    assert "all_attestations[2]" in failed["all_attestations"]


def test_result_json_shape(node: SimulatedNode, verifier: Verifier) -> None:
    obj = verifier.verify_report(node.report(NONCE), ALLOW, nonce=NONCE).to_dict()
    assert obj["ok"] is True
    assert all(set(c) == {"name", "status", "detail"} for c in obj["checks"])
    assert {c["status"] for c in obj["checks"]} <= {"pass", "fail", "skip"}
