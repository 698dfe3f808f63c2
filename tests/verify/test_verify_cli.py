"""The verify CLI, the measurements format, import isolation and the end-to-end flow."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.simulated_report import SimulatedNode
from tee_inference.cli import main
from tee_inference.signing import sha256_hex
from tee_inference.verify import (
    MeasurementsFormatError,
    Status,
    VerificationPolicy,
    Verifier,
    parse_expected_measurements,
)
from tee_inference.verify.e2e import verify_url

REDPILL_TEXT = (
    "e5542b0757e0b9d05bfa4a15da7bac97a03bd35d21b648ec492152708e795ff9:"
    "7a97926adb2044fd598b392eee98ad8f7c39ea3a47747ca968ef755bbf57c211"
)
REDPILL_SIG = (
    "faf0316a4860fd3d412cb5851b55687edc31f5600b4667502cf32112e1ad533b"
    "5d6420beb1fd7002334a46d897e11347837675bc01982485e00549091b06f8a81b"
)
REDPILL_ADDRESS = "0xD8414F83c1335627b31d08Eba6d2dA5Fa53A0A83"


def test_signature_command(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["verify", "signature", "--text", REDPILL_TEXT, "--signature", REDPILL_SIG]
    assert main([*argv, "--address", REDPILL_ADDRESS]) == 0
    assert (
        "ecdsa (EIP-191) signature by 0xD8414F83c1335627b31d08Eba6d2dA5Fa53A0A83" in capsys.readouterr().out
    )
    tampered = REDPILL_SIG[:10] + ("0" if REDPILL_SIG[10] != "0" else "1") + REDPILL_SIG[11:]
    assert main([*argv[:4], "--signature", tampered, "--address", REDPILL_ADDRESS, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["checks"][0]["name"] == "signature" and out["checks"][0]["status"] == "fail"


def test_signature_tamper_in_text_is_detected() -> None:
    from tee_inference.verify import verify_signature

    text = REDPILL_TEXT[:-1] + ("0" if REDPILL_TEXT[-1] != "0" else "1")
    check = verify_signature(text, REDPILL_SIG, address=REDPILL_ADDRESS)
    assert check.status is Status.FAIL
    assert "not by 0xD8414F83c1335627b31d08Eba6d2dA5Fa53A0A83" in check.detail


def test_ed25519_signature(tmp_path: Path) -> None:
    from tee_inference.verify import verify_signature

    node = SimulatedNode()
    sig = node.signer.ed25519.sign(REDPILL_TEXT).hex()
    key = node.signer.ed25519.public_key.hex()
    assert verify_signature(REDPILL_TEXT, sig, public_key=key).status is Status.PASS
    assert verify_signature(REDPILL_TEXT + "x", sig, public_key=key).status is Status.FAIL


def test_report_command_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = SimulatedNode()
    nonce = bytes(range(32))
    path = tmp_path / "report.json"
    path.write_text(json.dumps(node.report(nonce)))
    expect = tmp_path / "expected.json"
    expect.write_text(json.dumps(node.expected_measurements()))
    assert main(["verify", "report", str(path), "--json"]) == 1
    refused = json.loads(capsys.readouterr().out)
    assert refused["ok"] is False
    assert main(["verify", "report", str(path), "--allow-simulated", "--nonce", nonce.hex(),
                 "--expect", str(expect), "--json"]) == 0  # fmt: skip
    accepted = json.loads(capsys.readouterr().out)
    assert accepted["ok"] is True and accepted["simulated"] is True
    statuses = {c["name"]: c["status"] for c in accepted["checks"]}
    assert statuses["measurements"] == "pass" and statuses["freshness"] == "pass"
    assert accepted["relaxed"] == []
    # Without a nonce or an expected file nothing says "now" or "the software you expect":
    # that is not OK unless relaxed by name, and the verdict then says what was not checked.
    assert main(["verify", "report", str(path), "--allow-simulated"]) == 1
    assert "blocking: freshness (skip), measurements (skip)" in capsys.readouterr().out
    assert (
        main(["verify", "report", str(path), "--allow-simulated", "--allow-stale", "--no-measurements"]) == 0
    )
    table = capsys.readouterr().out
    assert (
        "verdict: OK (SIMULATED evidence: not hardware-backed) WITH RELAXATIONS: freshness not checked "
        "(--allow-stale), measurements not checked (--no-measurements)"
    ) in table
    assert re.search(r"^quote_signature +PASS +SIMULATED", table, re.M)
    assert main(["verify", "report", str(path), "--allow-stale", "--no-measurements", "--json",
                 "--allow-simulated"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["relaxed"] == ["freshness", "measurements"]


def test_quote_command_with_collateral(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quote = vectors / "tdx/dcap_qvl_sample_quote.bin"
    collateral = vectors / "tdx/dcap_qvl_sample_collateral.json"
    assert main(["verify", "quote", str(quote), "--collateral", str(collateral), "--now", "1750400000"]) == 0
    assert "UpToDate" in capsys.readouterr().out
    assert main(["verify", "quote", str(vectors / "dstack/quote.hex"), "--json"]) == 1
    assert main(["verify", "quote", str(vectors / "dstack/quote.hex"), "--allow-missing-collateral",
                 "--event-log", str(vectors / "dstack/event_log.json")]) == 0  # fmt: skip
    assert "skip~" in capsys.readouterr().out


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert main(["verify", "quote", str(tmp_path / "missing")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "tee-inference-measurements/v2", "tdx": {"mrdt": []}}')
    report = tmp_path / "r.json"
    report.write_text("{}")
    assert main(["verify", "report", str(report), "--expect", str(bad)]) == 2
    assert main(["verify", "report", str(report), "--nonce", "abc"]) == 2


def test_measurements_format_errors_name_the_field() -> None:
    base: dict[str, Any] = {"format": "tee-inference-measurements/v2"}
    cases = {
        json.dumps({**base, "mrtd": []}): "unknown key(s) mrtd",
        json.dumps({**base, "tdx": {"rtmr3": ["00" * 48]}}): "tdx.rtmr3 is not one of",
        json.dumps({**base, "tdx": {"mrtd": ["00" * 47]}}): "tdx.mrtd[0]",
        json.dumps({**base, "image_digest": ["sha1:00"]}): "image_digest[0]",
        json.dumps({**base, "models": {"m": {"root": "00"}}}): 'models.m must be {"weights_root": hex}',
        json.dumps({"format": "v0"}): "format must be",
        json.dumps({"format": "tee-inference-measurements/v1"}): "format v1 did not pin the platform",
        json.dumps({**base, "tdx": {"td_attributes": ["00" * 48]}}): "tdx.td_attributes[0]",
        json.dumps({**base, "unpinned": ["rtmr3"]}): "unpinned must list some of",
        json.dumps({**base, "image_digest": ["sha256:" + "00" * 32]}): "does not pin mrtd, rtmr0, rtmr1",
        "[": "not JSON",
    }
    for text, message in cases.items():
        with pytest.raises(MeasurementsFormatError, match=re.escape(message)):
            parse_expected_measurements(text)


def test_measurements_round_trip_is_canonical() -> None:
    node = SimulatedNode()
    expected = parse_expected_measurements(json.dumps(node.expected_measurements()))
    text = expected.to_json()
    assert parse_expected_measurements(text).to_json() == text
    assert text.startswith('{\n  "compose_hash"') and '"mrtd": [\n' in text


def test_verifier_imports_without_server_dependencies() -> None:
    code = (
        "import sys\n"
        "SERVER_ONLY = {'fastapi', 'starlette', 'uvicorn', 'vllm', 'prometheus_client', 'cffi', 'pynvml'}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in SERVER_ONLY:\n"
        "            raise ModuleNotFoundError('blocked: ' + name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import tee_inference.verify, tee_inference.verify.cli, tee_inference.verify.e2e\n"
        "from tee_inference.cli import main\n"
        "assert main(['verify', 'signature', '--text', 'x', '--signature', '00' * 65, '--address', '0x' + '00' * 20]) == 1\n"
        "assert main(['serve', '--engine', 'fake']) == 2\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
    assert "pip install 'tee-inference[server]'" in done.stderr


class FakeServer:
    """Answers the three endpoints verify_url uses, like a simulated server would."""

    def __init__(self, node: SimulatedNode, *, forge: bool = False) -> None:
        self.node, self.forge, self.signatures = node, forge, {}  # type: ignore[var-annotated]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/attestation/report":
            nonce = bytes.fromhex(request.url.params["nonce"])
            return httpx.Response(200, json=self.node.report(nonce))
        if request.url.path == "/v1/chat/completions":
            body = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'
            signer = SimulatedNode(seed=bytes(range(9, 41))).signer if self.forge else self.node.signer
            signed = signer.sign(sha256_hex(request.content), sha256_hex(body))
            self.signatures["chatcmpl-1"] = {"text": signed.text, "signature": signed.ecdsa.hex(),
                                             "signing_algo": "ecdsa", "signing_address": signed.signing_address}  # fmt: skip
            return httpx.Response(200, content=body, headers={"content-type": "application/json"})
        if request.url.path.startswith("/v1/signature/"):
            return httpx.Response(200, json=self.signatures[request.url.path.rsplit("/", 1)[1]])
        return httpx.Response(404)


@pytest.mark.parametrize("forge", [False, True])
def test_verify_url_end_to_end(forge: bool) -> None:
    node = SimulatedNode()
    client = httpx.Client(transport=httpx.MockTransport(FakeServer(node, forge=forge)), base_url="http://sim")
    expected = parse_expected_measurements(json.dumps(node.expected_measurements()))
    allow = VerificationPolicy.build(expected=[expected], allow_simulated=True, relax={"tls_binding"})
    result = verify_url("http://sim", node.model, allow, verifier=Verifier.production(), client=client)
    assert result.check("signature_text").status is Status.PASS
    if forge:
        assert not result.ok
        assert f"not by {node.signer.ecdsa.address}" in result.check("signature").detail
    else:
        assert result.ok, result.blocking
        assert result.check("freshness").status is Status.PASS
    refused = verify_url(
        "http://sim", node.model, VerificationPolicy(), verifier=Verifier.production(), client=client
    )
    assert not refused.ok
