"""The layer is complete: its wheels install offline into a clean Python and serve.

The image's interpreter is CPython 3.12 (vLLM's), and the layer's dependency wheels are chosen
for it. Debian 12 ships only 3.11, but this machine kind carries pyenv's CPython 3.12 builds:
the test uses the first working 3.12 it finds (PATH, /usr/bin, pyenv's versions). Without one it
falls back to the interpreter running the tests, with the layer built for that version
(`build_image.py wheels --python-version`: same lock, same wheel, entrypoint and scripts; only
the dependency wheels' ABI tags differ) and says so in the test's output.

Then, as the container would: a fresh venv (no site packages), the layer's own `bin/entrypoint`
run with that venv first on PATH (it pip-installs `--no-index --require-hashes` from the layer
alone; pip's configuration and environment are cleared so nothing else can supply a file), the
fake engine over TLS, `bin/healthcheck`, and a signed completion.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from support.servers import free_port
from test_image import build

PREFIX = "opt/tee-inference"


def _interpreter() -> tuple[str, str]:
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which("python3.12"), "/usr/bin/python3.12", "/usr/local/bin/python3.12",
                  *sorted(str(p) for p in pyenv.glob("3.12*/bin/python3.12"))]  # fmt: skip
    for candidate in filter(None, candidates):
        if not Path(candidate).is_file():
            continue
        probe = subprocess.run([candidate, "-c", "import sys, ssl, venv; print(sys.version_info[:2])"],
                               capture_output=True, text=True)  # fmt: skip
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 12)":
            return candidate, build.TARGET_PYTHON
    print(f"no CPython 3.12 here: checking the layer built for {sys.version.split()[0]} instead")
    return sys.executable, f"{sys.version_info.major}.{sys.version_info.minor}"


def _clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # no find-links or index from /etc/pip.conf
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    return env


def test_layer_installs_offline_and_serves(tmp_path: Path) -> None:
    python, version = _interpreter()
    root = tmp_path / "layer"
    build.wheel_set(root, build.REPO / "build" / "image-cache", version)
    layer = root / PREFIX
    wheels = sorted(p.name for p in (layer / "wheels").iterdir())
    assert any(w.startswith("tee_inference-") for w in wheels)
    assert any(w.startswith("nvidia_ml_py-") for w in wheels), "NVML comes from the layer, not the base"

    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    env = _clean_env(venv)
    port = free_port()
    args = ["--engine", "fake", "--tee", "simulated", "--tls", "self-signed", "--host", "127.0.0.1",
            "--port", str(port), "--tls-dir", str(tmp_path)]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [str(layer / "bin/entrypoint"), *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        health = [str(venv / "bin/python"), str(layer / "bin/healthcheck"), "--port", str(port)]
        deadline = time.monotonic() + 240
        while subprocess.run(health, env=env, capture_output=True).returncode != 0:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.5)
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        request = urllib.request.Request(
            f"https://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, context=context, timeout=30) as response:  # noqa: S310
            assert response.status == 200 and response.headers["X-Signature"]
        installed = subprocess.run([str(venv / "bin/python"), "-m", "pip", "list", "--format", "json"],
                                   env=env, capture_output=True, text=True, check=True)  # fmt: skip
        names = {p["name"].lower() for p in json.loads(installed.stdout)}
        assert {"tee-inference", "nvidia-ml-py", "cryptography", "uvicorn"} <= names
    finally:
        server.terminate()
        server.wait(30)
        log.close()
