"""The shipped dstack app-compose, read back and checked item by item against issue 13's list.

Every option the server is given is also parsed by the real `serve` parser, so a misspelt or
removed option fails here rather than at boot in a CVM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from support.paths import REPO
from tee_inference.cli import build_parser
from tee_inference.config import ServerConfig

APP = REPO / "image" / "app-compose.json"
EXPECTED = REPO / "measurements" / "expected.json"


@pytest.fixture(scope="module")
def app() -> dict[str, Any]:
    return dict(json.loads(APP.read_text()))


@pytest.fixture(scope="module")
def compose(app: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(app["docker_compose_file"]))  # JSON: a YAML document docker compose reads


@pytest.fixture(scope="module")
def server(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"]["tee-inference"])


@pytest.fixture(scope="module")
def serve_args(server: dict[str, Any]) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *server["command"]])


def _value(command: list[str], option: str) -> str:
    return command[command.index(option) + 1]


def test_hash_and_expected_measurements(app: dict[str, Any], server: dict[str, Any]) -> None:
    expected = json.loads(EXPECTED.read_text())
    compose_hash = hashlib.sha256(APP.read_bytes()).hexdigest()
    assert expected["compose_hash"] == [compose_hash]
    assert expected["tdx"]["mrconfigid"] == ["01" + compose_hash + "00" * 15]
    digest = expected["image_digest"][0]
    assert server["image"].endswith("@" + digest), "the image is named by the pinned digest"
    assert app["kms_enabled"] is True and app["local_key_provider_enabled"] is False


def test_key_quotes_digest_from_dstack(serve_args: argparse.Namespace, server: dict[str, Any]) -> None:
    assert serve_args.key_source == "dstack"
    assert serve_args.tdx_provider == "dstack"
    assert "/var/run/dstack.sock:/var/run/dstack.sock" in server["volumes"]
    assert serve_args.image_digest == server["image"].rpartition("@")[2]


def test_tls_only_port(serve_args: argparse.Namespace, server: dict[str, Any]) -> None:
    assert serve_args.tls == "self-signed" and not serve_args.insecure_plaintext
    assert server["ports"] == [f"{serve_args.port}:{serve_args.port}"], "one published port, the TLS one"
    assert serve_args.host == "127.0.0.1", "the entrypoint supplies --host 0.0.0.0; the compose does not"


def test_api_key_from_encrypted_env(app: dict[str, Any], serve_args: argparse.Namespace,
                                    server: dict[str, Any]) -> None:  # fmt: skip
    var = serve_args.api_key_env
    assert var and var in app["allowed_envs"]
    assert server["environment"][var] == "${" + var + "}", "only a reference: the value arrives encrypted"


def test_weights_provisioned_and_checked_before_start(compose: dict[str, Any], serve_args: argparse.Namespace,
                                                      server: dict[str, Any], app: dict[str, Any]) -> None:  # fmt: skip
    expected = json.loads(EXPECTED.read_text())
    weights = compose["services"]["weights"]
    root = expected["models"]["SmolLM2-135M-Instruct"]["weights_root"]
    assert serve_args.expect_weights_root == root and serve_args.model == "/models/SmolLM2-135M-Instruct"
    assert server["depends_on"] == {"weights": {"condition": "service_completed_successfully"}}
    assert (
        weights["entrypoint"] == ["/opt/tee-inference/bin/fetch-model"]
        and weights["image"] == server["image"]
    )
    assert _value(weights["command"], "--expect-weights-root") == root
    assert _value(weights["command"], "--dest") == serve_args.model
    manifest = _value(weights["command"], "--manifest")
    assert manifest == "/opt/tee-inference/models/SmolLM2-135M-Instruct.manifest"
    shipped = REPO / "measurements" / "models" / Path(manifest).name
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == root, (
        "the image ships the manifest of the root"
    )
    assert _value(weights["command"], "--url-env") in app["allowed_envs"]
    assert weights["restart"] == "no"
    assert "models:/models:ro" in server["volumes"] and "models:/models" in weights["volumes"]


def test_gpu_gate_restart_health(serve_args: argparse.Namespace, server: dict[str, Any]) -> None:
    assert serve_args.gpu_ready_gate is True
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert server["restart"] == "unless-stopped"
    health = server["healthcheck"]
    assert health["test"] == ["CMD", "/opt/tee-inference/bin/healthcheck", "--port", str(serve_args.port)]
    assert health["start_period"] and health["retries"] >= 1


def test_server_config_from_compose_is_valid(serve_args: argparse.Namespace) -> None:
    """The options build a valid `--tee tdx` configuration (what the entrypoint adds: --tee tdx)."""
    config = ServerConfig.build(
        tee="tdx", key_source=serve_args.key_source, tdx_provider=serve_args.tdx_provider,
        tls=serve_args.tls, api_key_env=serve_args.api_key_env, image_digest=serve_args.image_digest,
        model_weights_root=serve_args.expect_weights_root, gpu_ready_gate=serve_args.gpu_ready_gate,
    )  # fmt: skip
    assert config.tee == "tdx" and config.tls == "self-signed"


def test_systemd_unit_runs_the_same_server() -> None:
    """image/tee-inference.service (plain TDX VM): its `docker run` passes options `serve` accepts."""
    unit = (REPO / "image" / "tee-inference.service").read_text()
    start = unit.split("ExecStart=", 1)[1].split("\nExecStop", 1)[0].replace("\\\n", " ")
    words = start.split()
    assert words[:3] == ["/usr/bin/docker", "run", "--rm"] and "--privileged" in words
    assert "-p" in words and words[words.index("-p") + 1] == "8443:8443"
    args = build_parser().parse_args(["serve", *words[words.index("${IMAGE}") + 1 :]])
    assert (args.tls, args.port, args.tdx_provider, args.gpu_ready_gate) == (
        "self-signed",
        8443,
        "configfs",
        True,
    )
    assert args.api_key_env == "TEE_INFERENCE_API_KEY" and args.expect_weights_root == "${WEIGHTS_ROOT}"


def test_a_compose_for_dstack_releases_without_emit_event() -> None:
    """`regenerate.py --tdx-provider dstack-native`: our RTMR3 events through the TDX guest device."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compose_module", REPO / "image" / "compose.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    compose_text = module.compose_text

    app = json.loads(compose_text("registry/tee@sha256:" + "ab" * 32, "m", "cd" * 32, "dstack-native"))
    server = json.loads(app["docker_compose_file"])["services"]["tee-inference"]
    args = build_parser().parse_args(["serve", *server["command"]])
    assert args.tdx_provider == "dstack-native"
    assert server["devices"] == ["/dev/tdx_guest:/dev/tdx_guest"]
    assert "/var/run/dstack.sock:/var/run/dstack.sock" in server["volumes"]  # quotes: still the agent
    shipped = json.loads(compose_text("registry/tee@sha256:" + "ab" * 32, "m", "cd" * 32))
    assert "devices" not in json.loads(shipped["docker_compose_file"])["services"]["tee-inference"]
    with pytest.raises(ValueError, match="tdx_provider"):
        compose_text("registry/tee@sha256:" + "ab" * 32, "m", "cd" * 32, "configfs")
