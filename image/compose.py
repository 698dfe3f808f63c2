"""The dstack app-compose this repository deploys (what image/app-compose.json holds).

Generated, never edited: ``measurements/regenerate.py`` writes it from the image digest and the
weights root, and its sha256 is the compose hash dstack measures (RTMR3 ``compose-hash`` and
MRCONFIGID). ``tests/test_compose.py`` reads it back and checks every item.
"""

from __future__ import annotations

import hashlib
import json

PREFIX = "/opt/tee-inference"
PORT = 8443  # TLS only: the server's in-CVM key; there is no plaintext port


API_KEY_ENV = "TEE_INFERENCE_API_KEY"
MODEL_URL_ENV = "TEE_INFERENCE_MODEL_URL"
DSTACK_SOCKET = "/var/run/dstack.sock"
# Every GPU of the CVM goes to the server (the gate attests them all; vLLM may use them all).
GPUS = {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
# How RTMR3 is extended: through the agent's EmitEvent ("dstack", released dstack OS images), or
# through the TDX guest device ("dstack-native", OS images whose agent has no EmitEvent).
TDX_PROVIDERS = ("dstack", "dstack-native")
TDX_GUEST = "/dev/tdx_guest"


def compose_services(
    image_ref: str, model: str, weights_root: str, tdx_provider: str = "dstack"
) -> dict[str, object]:
    """The docker compose project: a one-shot ``weights`` service, then the server.

    - weights: ``fetch-model`` (image/fetch_model.py) fills the ``models`` volume with exactly
      the files of the shipped manifest, checked against ``weights_root``, before the server starts.
    - tee-inference: quotes through the dstack agent (socket mounted), signing key from the dstack
      KMS, the image digest passed in (the image cannot name its own digest), TLS inside the
      process on the only published port, the API key from dstack's encrypted environment, the
      GPUs attested locally and only then marked ready (--gpu-ready-gate), weights read-only.
    """
    if tdx_provider not in TDX_PROVIDERS:
        raise ValueError(f"tdx_provider is one of {', '.join(TDX_PROVIDERS)}, not {tdx_provider!r}")
    digest = image_ref.rpartition("@")[2]
    directory = f"/models/{model}"
    server = [
        "--model", directory, "--expect-weights-root", weights_root,
        "--tdx-provider", tdx_provider, "--key-source", "dstack", "--image-digest", digest,
        "--tls", "self-signed", "--port", str(PORT), "--api-key-env", API_KEY_ENV, "--gpu-ready-gate",
    ]  # fmt: skip
    weights = [
        "--manifest", f"{PREFIX}/models/{model}.manifest", "--dest", directory,
        "--url-env", MODEL_URL_ENV, "--expect-weights-root", weights_root,
    ]  # fmt: skip
    native = {"devices": [f"{TDX_GUEST}:{TDX_GUEST}"]} if tdx_provider == "dstack-native" else {}
    return {
        "services": {
            "weights": {
                "image": image_ref,
                "entrypoint": [f"{PREFIX}/bin/fetch-model"],
                "command": weights,
                "environment": {MODEL_URL_ENV: "${" + MODEL_URL_ENV + ":-}"},
                "volumes": ["models:/models"],
                "restart": "no",
            },
            "tee-inference": {
                "image": image_ref,
                "command": server,
                "depends_on": {"weights": {"condition": "service_completed_successfully"}},
                "environment": {API_KEY_ENV: "${" + API_KEY_ENV + "}"},
                "ports": [f"{PORT}:{PORT}"],
                "volumes": [f"{DSTACK_SOCKET}:{DSTACK_SOCKET}", "models:/models:ro"],
                "runtime": "nvidia",
                "deploy": {"resources": {"reservations": {"devices": [GPUS]}}},
                "restart": "unless-stopped",
                **native,
                "healthcheck": {
                    "test": ["CMD", f"{PREFIX}/bin/healthcheck", "--port", str(PORT)],
                    "interval": "30s",
                    "timeout": "10s",
                    "retries": 3,
                    "start_period": "900s",  # vLLM loads the model and warms up first
                },
            },
        },
        "volumes": {"models": {}},
    }


def compose_text(image_ref: str, model: str, weights_root: str, tdx_provider: str = "dstack") -> str:
    """dstack app-compose (manifest_version 2); compose_hash = sha256 of exactly these bytes.

    The docker compose file inside is written as JSON, which is YAML too (docker compose reads
    it as such): no YAML emitter is needed, nothing is left to YAML's implicit typing (``no``,
    ``8443:8443``), and a test reads it back with ``json``.
    """
    services = compose_services(image_ref, model, weights_root, tdx_provider)
    compose = json.dumps(services, indent=2, sort_keys=True) + "\n"
    app = {
        "manifest_version": 2,
        "name": "tee-inference",
        "runner": "docker-compose",
        "docker_compose_file": compose,
        "kms_enabled": True,
        "gateway_enabled": False,
        "local_key_provider_enabled": False,
        "public_logs": True,
        "public_sysinfo": True,
        "public_tcbinfo": True,
        "no_instance_id": False,
        "secure_time": True,
        # Values come encrypted to the CVM's KMS key; only names listed here are accepted.
        "allowed_envs": [API_KEY_ENV, MODEL_URL_ENV],
        "pre_launch_script": "",
    }
    return json.dumps(app, indent=2, sort_keys=True) + "\n"


def compose_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
