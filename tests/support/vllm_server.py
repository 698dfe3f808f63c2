"""Starting `tee-inference serve --engine vllm` for the slow suite, as `make run` does."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from support.paths import REPO


def engine_paths() -> tuple[Path, Path]:
    """The engine venv and the model directory `make test-slow` built."""
    venv, model = os.environ.get("TEE_INFERENCE_ENGINE_VENV"), os.environ.get("TEE_INFERENCE_TEST_MODEL")
    if not venv or not model:
        pytest.fail(
            "run through `make test-slow`: it builds the engine venv and the model and sets their paths"
        )
    return Path(venv), Path(model)


def make_run_command(port: int, *extra: str) -> list[str]:
    """`make run`'s command: a simulated dstack CVM that launched image/app-compose.json."""
    venv, model = engine_paths()
    digest = json.loads((REPO / "measurements" / "expected.json").read_text())["image_digest"][0]
    return [str(venv / "bin" / "tee-inference"), "serve", "--engine", "vllm", "--tee", "simulated",
            "--simulated-compose", str(REPO / "image" / "app-compose.json"), "--image-digest", digest,
            "--gpu-ready-gate", "--model", str(model), "--port", str(port), "--build-dir", str(Path("build").resolve()),
            *extra]  # fmt: skip


@contextmanager
def serving(command: list[str], url: str, log: Path, verify: ssl.SSLContext | bool = True) -> Iterator[None]:
    """Run ``command`` until ``url`` lists its models (at most 7 minutes); stop its process group."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 420
            while True:
                if process.poll() is not None:
                    pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"server not healthy in time:\n{log.read_text()[-4000:]}")
                try:
                    if httpx.get(url + "/v1/models", timeout=2, verify=verify).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            yield
        finally:
            os.killpg(process.pid, 15)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
