"""Verdicts a workload could earn by describing itself: each finding reproduced, each now refused.

A malicious image on genuine hardware controls everything it reports and every RTMR3 event it
emits after boot (dstack lets an application call EmitEvent). These tests build such reports from
the simulated primitives and check that the verifier no longer says ``ok``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from support.simulated_report import COMPOSE, SimulatedNode
from tee_inference.attestation.eventlog import (
    EVENT_IMAGE,
    EVENT_MODEL_WEIGHTS,
    EventLog,
    runtime_event,
)
from tee_inference.attestation.simulated_platform import SimulatedPlatform
from tee_inference.verify import (
    MeasurementsFormatError,
    Status,
    VerificationPolicy,
    Verifier,
    parse_expected_measurements,
)

NONCE = bytes.fromhex("5a" * 32)
VERIFIER = Verifier.production()


def _expected(node: SimulatedNode, **changes: Any) -> VerificationPolicy:
    doc = node.expected_measurements()
    doc.update(changes)
    return VerificationPolicy.build(
        expected=[parse_expected_measurements(json.dumps(doc))], allow_simulated=True
    )


def _blocking(result: Any) -> dict[str, str]:
    return {c.name: c.detail for c in result.blocking}


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# 1. Last event wins -----------------------------------------------------------------------------


def test_an_application_compose_hash_after_system_ready_is_not_the_platform_s() -> None:
    node = SimulatedNode()
    forged = bytes.fromhex("ee" * 32)
    node.log.append(runtime_event("compose-hash", forged))
    # An expected file naming the forged compose: the old verifier took the last event and passed.
    policy = _expected(node, compose_hash=[forged.hex()])
    result = VERIFIER.verify_report(node.report(NONCE), policy, nonce=NONCE)
    blocking = _blocking(result)
    assert (
        "comes after system-ready: an application claiming to be the platform" in blocking["runtime_events"]
    )
    assert "measurements" in blocking
    # And with the honest compose pinned, it still fails: the log breaks the rules.
    honest = VERIFIER.verify_report(node.report(NONCE), _expected(SimulatedNode()), nonce=NONCE)
    assert not honest.ok


def test_two_weights_events_for_one_model_fail() -> None:
    node = SimulatedNode()
    node.log.append(runtime_event(EVENT_MODEL_WEIGHTS, _json({"model": node.model, "root": "00" * 32})))
    result = VERIFIER.verify_report(node.report(NONCE), _expected(node), nonce=NONCE)
    assert "weights of model 'sim-model' recorded twice" in _blocking(result)["runtime_events"]


def test_our_events_before_system_ready_and_duplicate_platform_events_fail() -> None:
    node = SimulatedNode()
    platform = SimulatedPlatform.launch(COMPOSE, node.seed).events()
    ready = next(i for i, e in enumerate(platform) if e.event == "system-ready")
    early = runtime_event(EVENT_IMAGE, _json({"image_digest": None, "version": "0"}))
    twice = runtime_event("compose-hash", bytes(32))
    node.log = EventLog(
        [*platform[:ready], early, twice, *platform[ready:], *node.log.events[len(platform) :]]
    )
    blocking = _blocking(VERIFIER.verify_report(node.report(NONCE), _expected(node), nonce=NONCE))
    assert "comes before system-ready, where only the platform writes" in blocking["runtime_events"]
    assert "'compose-hash' appears twice before system-ready" in blocking["runtime_events"]


# 2. ok with no measurement check --------------------------------------------------------------


def test_no_expected_file_is_not_ok_unless_relaxed_by_name() -> None:
    node = SimulatedNode()
    bare = VerificationPolicy.build(allow_simulated=True)
    result = VERIFIER.verify_report(node.report(NONCE), bare, nonce=NONCE)
    assert not result.ok
    assert [c.name for c in result.blocking] == ["measurements"]
    assert "--no-measurements" in result.check("measurements").detail
    relaxed = VerificationPolicy.build(allow_simulated=True, relax={"measurements"})
    accepted = VERIFIER.verify_report(node.report(NONCE), relaxed, nonce=NONCE)
    assert accepted.ok and accepted.relaxations() == ["measurements"]
    assert accepted.to_dict()["relaxed"] == ["measurements"]


def test_the_library_defaults_are_the_strict_ones() -> None:
    assert VerificationPolicy().measurements is None and VerificationPolicy().relax == frozenset()
    with pytest.raises(ValueError, match="cannot relax report_data"):
        VerificationPolicy(relax=frozenset({"report_data"}))


# 3. The expected file must pin the platform -----------------------------------------------------


def test_an_expected_file_that_leaves_the_platform_open_is_refused() -> None:
    node = SimulatedNode()
    doc = node.expected_measurements()
    del doc["tdx"]["rtmr1"], doc["compose_hash"]
    with pytest.raises(MeasurementsFormatError, match="does not pin rtmr1, compose_hash"):
        parse_expected_measurements(json.dumps(doc))
    doc["unpinned"] = ["rtmr1", "compose_hash"]
    policy = VerificationPolicy.build(
        expected=[parse_expected_measurements(json.dumps(doc))], allow_simulated=True
    )
    result = VERIFIER.verify_report(node.report(NONCE), policy, nonce=NONCE)
    assert result.ok
    assert "NOT pinned: compose_hash, rtmr1" in result.check("measurements").detail


def test_mrconfigid_must_be_the_launched_compose() -> None:
    node = SimulatedNode()
    report = node.report(NONCE)
    # The host launched another compose (MRCONFIGID) than the one RTMR3 records.
    other = SimulatedPlatform.launch(b"other compose", node.seed).mrconfigid
    node_quote = node.quote_signer.quote
    forged = node_quote(
        bytes.fromhex(report["intel_quote"])[568:632],
        mrtd=node.mrtd,
        rtmrs=node.log.rtmrs(),
        mrconfigid=other,
    )
    blocking = _blocking(
        VERIFIER.verify_report({**report, "intel_quote": forged.hex()}, _expected(node), nonce=NONCE)
    )
    assert "the host launched another compose" in blocking["mrconfigid"]
    assert "mrconfigid is" in blocking["measurements"]


def test_td_report_fields_can_be_pinned() -> None:
    node = SimulatedNode()
    doc = node.expected_measurements()
    doc["tdx"]["xfam"] = ["e700000000000000"]
    doc["tdx"]["mrseam"] = ["11" * 48]
    policy = VerificationPolicy.build(
        expected=[parse_expected_measurements(json.dumps(doc))], allow_simulated=True
    )
    detail = _blocking(VERIFIER.verify_report(node.report(NONCE), policy, nonce=NONCE))["measurements"]
    assert "xfam is e702060000000000, expected e700000000000000" in detail
    assert "mrseam is" in detail


# 4. Freshness ---------------------------------------------------------------------------------


def test_a_replayed_report_without_a_nonce_is_not_ok() -> None:
    node = SimulatedNode()
    result = VERIFIER.verify_report(node.report(NONCE), _expected(node))
    assert not result.ok
    assert result.check("freshness").status is Status.SKIP
    assert "could be a replay" in result.check("freshness").detail
    stale = VerificationPolicy(
        simulated=_expected(node).simulated,
        measurements=_expected(node).measurements,
        relax=frozenset({"freshness"}),
    )
    assert VERIFIER.verify_report(node.report(NONCE), stale).ok


# 5. Algorithm substitution ----------------------------------------------------------------------


def test_an_ed25519_answer_to_an_ecdsa_question_attests_no_ecdsa_key() -> None:
    node = SimulatedNode()
    result = VERIFIER.verify_report(
        node.report(NONCE, "ed25519"), _expected(node), nonce=NONCE, signing_algo="ecdsa"
    )
    assert "asked for an ecdsa report, got ed25519" in _blocking(result)["signing_algo"]
    assert result.attested["signing_address"] is None


def test_a_swapped_public_key_without_touching_the_quote_fails() -> None:
    node, other = SimulatedNode(), SimulatedNode(seed=bytes(range(7, 39)))
    report = node.report(NONCE)
    report["signing_public_key"] = other.signer.ecdsa.public_key.hex()
    result = VERIFIER.verify_report(report, _expected(node), nonce=NONCE)
    assert "belongs to" in _blocking(result)["signing_key"]
    assert result.attested["signing_public_key"] is None and result.attested["signing_address"] is None


# 6. Every node of all_attestations on its own ---------------------------------------------------


def test_an_entry_reusing_the_primary_quote_with_another_address_fails() -> None:
    node, other = SimulatedNode(), SimulatedNode(seed=bytes(range(11, 43)))
    report = node.report(NONCE)
    impostor = {**copy.deepcopy(report["all_attestations"][0]), "signing_address": other.signer.ecdsa.address,
                "signing_public_key": other.signer.ecdsa.public_key.hex()}  # fmt: skip
    report["all_attestations"].append(impostor)
    result = VERIFIER.verify_report(report, _expected(node), nonce=NONCE)
    assert "reuses another node's quote" in _blocking(result)["all_attestations"]
    nodes = result.attested["nodes"]
    assert [n["ok"] for n in nodes] == [True, False]
    assert other.signer.ecdsa.address in nodes[1]["node"]


def test_every_node_is_listed_by_address() -> None:
    node, second = SimulatedNode(), SimulatedNode(seed=bytes(range(2, 34)))
    report = node.report(NONCE)
    report["all_attestations"].append(second.report(NONCE)["all_attestations"][0])
    result = VERIFIER.verify_report(report, _expected(node), nonce=NONCE)
    assert result.ok, _blocking(result)
    listed = [(n["node"], n["ok"], n["signing_address"]) for n in result.attested["nodes"]]
    assert listed[0][2] == node.signer.ecdsa.address and listed[1][2] == second.signer.ecdsa.address
    assert all(ok for _, ok, _ in listed)


# 7. TD attributes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ("0000000000000000", "SEPT_VE_DISABLE is clear"),
        ("0100001000000000", "DEBUG is set"),
        ("0000003000000000", "MIGRATABLE is set"),
        ("0000009000000000", "outside what the TDX module allows"),
    ],
)
def test_td_attributes_policy(attributes: str, message: str) -> None:
    node = SimulatedNode()
    report = node.report(NONCE)
    quote = node.quote_signer.quote(
        bytes.fromhex(report["intel_quote"])[568:632], mrtd=node.mrtd, rtmrs=node.log.rtmrs(),
        mrconfigid=node.platform.mrconfigid, td_attributes=bytes.fromhex(attributes),
    )  # fmt: skip
    result = VERIFIER.verify_report({**report, "intel_quote": quote.hex()}, _expected(node), nonce=NONCE)
    assert message in _blocking(result)["td_attributes"]


# 9. Messages ----------------------------------------------------------------------------------


def test_a_server_without_an_image_digest_says_so() -> None:
    node = SimulatedNode(image_digest=None)
    node.log.append(runtime_event(EVENT_IMAGE, _json({"image_digest": None, "version": "0.1.0"})))
    result = VERIFIER.verify_report(node.report(NONCE), _expected(node), nonce=NONCE)
    assert (
        result.check("image_event").detail == "RTMR3 records no image digest: not started from a built image"
    )
    assert "None" not in result.check("image_event").detail


# 8. GPUs: one device cannot serve two nodes ---------------------------------------------------


def test_two_nodes_presenting_one_gpu_fail() -> None:
    node, second = SimulatedNode(), SimulatedNode(seed=bytes(range(2, 34)))
    second.gpu = node.gpu  # the second CVM shows the first one's GPU evidence as its own
    report = node.report(NONCE)
    report["all_attestations"].append(second.report(NONCE)["all_attestations"][0])
    result = VERIFIER.verify_report(report, _expected(node), nonce=NONCE)
    detail = _blocking(result)["all_attestations"]
    assert "gpu_distinct" in detail and "two nodes cannot hold one GPU" in detail


def test_eight_copies_of_one_gpu_are_one_gpu() -> None:
    node = SimulatedNode()
    report = node.report(NONCE)
    payload = json.loads(report["nvidia_payload"])
    payload["evidence_list"] = payload["evidence_list"] * 8
    report["nvidia_payload"] = json.dumps(payload)
    report["all_attestations"] = [
        {**report["all_attestations"][0], "nvidia_payload": report["nvidia_payload"]}
    ]
    result = VERIFIER.verify_report(report, _expected(node), nonce=NONCE)
    assert "gpu_distinct" in _blocking(result)
