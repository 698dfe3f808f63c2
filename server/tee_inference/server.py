"""Assembling and running the server for each engine choice.

`--engine fake`        SigningMiddleware → FakeEngine, in this process.
`--upstream URL`       SigningMiddleware → proxy app → an engine already running at URL.
`--engine vllm`        vLLM child with SigningMiddleware loaded in-process (`--middleware`).
`--engine vllm --proxy` vLLM child on a private port ← SigningMiddleware → proxy app.

Every deployment boots once, here, before anything listens (`boot.boot`): a refused start is a
`StartRefused` that the CLI prints, before vLLM spends minutes loading weights. With vLLM
in-process, the API processes resume that boot over the launcher's handoff socket (`handoff.py`).
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

import httpx
import uvicorn

from tee_inference.asgi import ASGIApp
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.engines.proxy import create_proxy_app
from tee_inference.engines.vllm import (
    VllmProcess,
    cpu_engine_env,
    free_port,
    is_vllm_cpu,
    vllm_command,
)
from tee_inference.handoff import HandoffServer
from tee_inference.middleware import SigningMiddleware
from tee_inference.nodestore import NodeStoreServer
from tee_inference.services import Services
from tee_inference.tls import CIPHERS, CertificateWatcher, TlsService
from tee_inference.transport import uvicorn_options

log = logging.getLogger("tee_inference")

SIMULATED_WARNING = (
    "WARNING: --tee simulated: quotes and GPU evidence are SIGNED BY A LOCAL SIMULATION KEY and prove "
    'nothing about where this runs; every report says "simulated": true. Never use this in production.'
)


@dataclass(frozen=True)
class ServeOptions:
    config: ServerConfig
    engine: str
    upstream: str | None
    model: str
    served_model_name: str
    host: str
    port: int
    proxy: bool = False
    engine_args: tuple[str, ...] = ()
    fake_token_delay_s: float = 0.0
    build_dir: Path = Path("build")
    start_timeout_s: float = 900.0


def build_app(options: ServeOptions, services: Services) -> ASGIApp:
    """The in-process ASGI app for the fake engine or a proxied upstream."""
    inner: ASGIApp
    if options.upstream is not None:
        inner = create_proxy_app(
            options.upstream,
            request_timeout_s=services.config.engine_timeout_s,
            response_timeout_s=services.config.engine_response_timeout_s,
        )
    else:
        inner = FakeEngine(options.served_model_name, token_delay_s=options.fake_token_delay_s)
    return SigningMiddleware(inner, services=services)


def _signing_address(base_url: str, api_key_env: str | None, verify: ssl.SSLContext | bool) -> str:
    """The serving process's address, as its own attestation report states it."""
    headers = {"authorization": f"Bearer {os.environ[api_key_env]}"} if api_key_env else {}
    try:
        report = httpx.get(
            f"{base_url}/v1/attestation/report", headers=headers, timeout=60, verify=verify
        ).json()
        return str(report["signing_address"])
    except (httpx.HTTPError, ValueError, KeyError):
        return "(see /v1/attestation/report)"


def usage_banner(
    base_url: str, model: str, api_key_env: str | None, signing_address: str, tls: TlsService | None = None
) -> str:
    auth = f' -H "Authorization: Bearer ${api_key_env}"' if api_key_env else ""
    pinned = ""
    if tls is not None:
        # curl cannot pin an SPKI hash on its own: -k plus the fingerprint a client checks against
        # the attestation (tee-inference verify url / tee_inference.client do it for you).
        auth += " -k"
        pinned = (
            f"  TLS {tls.mode}, certificate SPKI sha256 {tls.spki_sha256.hex()} (bound in every report)\n"
        )
    return (
        f"\ntee-inference is serving {model!r} at {base_url}\n"
        f"  signing address {signing_address}\n"
        f"{pinned}"
        f"  curl -s {base_url}/v1/chat/completions{auth} -H 'content-type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "temperature": 0, "max_tokens": 32, '
        f'"messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}\' -i\n'
        f"  curl -s{' -k' if tls else ''} '{base_url}/v1/signature/<id from the answer>?model={model}'\n"
    )


def _run_uvicorn(
    app: ASGIApp, host: str, port: int, config: ServerConfig, tls: TlsService | None = None
) -> int:
    factory = None
    if tls is not None:

        def factory(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            return tls.serve_context()

    # The transport's limits and enveloped errors (transport.py); no access log: ours has no content.
    uvicorn_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        server_header=False,
        log_level="info",
        ssl_context_factory=factory,
        access_log=False,
        **uvicorn_options(config),
    )
    uvicorn.Server(uvicorn_config).run()
    return 0


def _local_verify(tls: TlsService | None) -> ssl.SSLContext | bool:
    """How the launcher talks to its own child: pinned to the chain it just wrote, never unchecked."""
    if tls is None:
        return True
    context = ssl.create_default_context(cadata=tls.state()["chain"])
    context.check_hostname = False  # loopback by address; the certificate itself is what is pinned
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _start_tls(config: ServerConfig, services: Services) -> TlsService | None:
    """Write this boot's TLS files to a RAM file system and watch --tls-cert for a renewed chain."""
    tls = services.keys.tls
    if tls is None:
        return None
    tls.write_files(config.tls_dir, require_ram=config.tee == "tdx")
    if config.tls == "files" and config.tls_cert is not None:
        CertificateWatcher(tls, config.tls_cert).start()
    if services.boot_state is not None:
        services.boot_state = replace(services.boot_state, tls=tls.state())
    return tls


def serve(options: ServeOptions) -> int:
    if options.config.tee == "simulated":
        print(SIMULATED_WARNING, file=sys.stderr, flush=True)
    base_url = f"http://{options.host}:{options.port}"
    if options.engine == "vllm" and options.upstream is None:
        return _serve_vllm(options, base_url)
    services = boot(options.config)
    tls = _start_tls(options.config, services)
    try:
        app = build_app(options, services)
        address = services.signer.ecdsa.address
        url = base_url.replace("http://", "https://") if tls else base_url
        banner = usage_banner(url, options.served_model_name, options.config.api_key_env, address, tls)
        print(banner, flush=True)
        return _run_uvicorn(app, options.host, options.port, options.config, tls)
    finally:
        if tls is not None:
            tls.close()


def _api_server_args(config: ServerConfig) -> tuple[str, ...]:
    """vLLM's own API-process count; each process resumes this boot and signs with its key."""
    return ("--api-server-count", str(config.api_server_count)) if config.api_server_count > 1 else ()


def _serve_vllm(options: ServeOptions, base_url: str) -> int:
    config = options.config.model_copy(update={"served_models": (options.served_model_name,)})
    services = boot(config)
    tls = _start_tls(config, services)
    assert services.boot_state is not None  # set by boot()
    in_process = not options.proxy
    handoff = HandoffServer(services.boot_state).start() if in_process else None
    # Several API processes, no Redis: they share this launcher's store (nodestore.py).
    node_store = None
    if in_process and config.api_server_count > 1 and not config.redis_url:
        node_store = NodeStoreServer(
            max_entries=config.signature_max_entries, max_bytes=config.signature_max_bytes
        ).start()
    child_config = config.model_copy(update={"node_store": node_store.name if node_store else None})
    env = {**os.environ, **child_config.to_env(), **(handoff.env() if handoff else {})}
    if is_vllm_cpu():
        env.update(cpu_engine_env(options.build_dir.resolve()))
    port = options.port if in_process else free_port()
    host = options.host if in_process else "127.0.0.1"
    child = VllmProcess(
        vllm_command(
            options.model,
            served_model_name=options.served_model_name,
            host=host,
            port=port,
            in_process_signing=in_process,
            extra_args=(*_api_server_args(config), *options.engine_args),
            tls_files=(tls.files.key_path, tls.files.cert_path) if tls and tls.files and in_process else None,
            tls_ciphers=CIPHERS,
        ),
        env,
    )

    def stop(signum: int, _: FrameType | None) -> None:
        # Only unwind here: the handler may interrupt Popen.wait, which holds the lock that
        # child.stop() needs; the `finally` below stops vLLM once the wait has let go.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    child.start()
    try:
        scheme = "https" if tls and in_process else "http"
        verify = _local_verify(tls if in_process else None)
        elapsed = child.wait_healthy(
            f"{scheme}://127.0.0.1:{port}/health", options.start_timeout_s, verify=verify
        )
        log.info("vLLM healthy after %.1f s", elapsed)
        if in_process:
            address = _signing_address(f"{scheme}://127.0.0.1:{port}", config.api_key_env, verify)
            url = base_url.replace("http://", f"{scheme}://")
            print(usage_banner(url, options.served_model_name, config.api_key_env, address, tls), flush=True)
            return child.wait()
        app = build_app(
            ServeOptions(**{**options.__dict__, "upstream": f"http://127.0.0.1:{port}", "config": config}),
            services,
        )
        address = services.signer.ecdsa.address
        url = base_url.replace("http://", "https://") if tls else base_url
        print(usage_banner(url, options.served_model_name, config.api_key_env, address, tls), flush=True)
        return _run_uvicorn(app, options.host, options.port, config, tls)
    except KeyboardInterrupt:
        return 130
    finally:
        child.stop()
        if handoff is not None:
            handoff.close()
        if node_store is not None:
            node_store.close()
        if tls is not None:
            tls.close()
