"""`tee-inference serve`: the signing server in front of an engine (assembled in server.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tee_inference.commands import Subparsers
from tee_inference.commands.keys import add_key_options
from tee_inference.exceptions import ConfigError


def add_parser(commands: Subparsers) -> None:
    serve = commands.add_parser("serve", help="run the signing server in front of an engine")
    serve.add_argument(
        "--tee",
        choices=["tdx", "simulated"],
        default="simulated",
        help="attestation backend; simulated signs with a local key and says so everywhere",
    )
    serve.add_argument(
        "--engine",
        choices=["vllm", "fake"],
        default="vllm",
        help="vllm: a real vLLM child; fake: the built-in deterministic engine",
    )
    serve.add_argument("--upstream", metavar="URL", help="front an OpenAI-compatible engine already running")
    serve.add_argument("--model", help="model directory or name (vllm); the served name (fake)")
    serve.add_argument("--served-model-name", help="name clients use (default: the model directory's name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key-env", metavar="VAR", help="require 'Authorization: Bearer $VAR'")
    serve.add_argument(
        "--proxy",
        action="store_true",
        help="with --engine vllm: run vLLM on a private port behind the standalone proxy "
        "instead of loading the middleware inside vLLM",
    )
    serve.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `vllm serve` (repeatable)",
    )
    serve.add_argument(
        "--fake-token-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --engine fake: pause between streamed tokens",
    )
    serve.add_argument(
        "--signature-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how long signatures stay fetchable (at least 1800)",
    )
    serve.add_argument(
        "--max-inflight-completions",
        type=int,
        metavar="N",
        help="completions in progress at most; more are answered 429 with Retry-After (default 512)",
    )
    serve.add_argument(
        "--max-ttft",
        type=float,
        metavar="SECONDS",
        help="shed new completions (429) while the recent time to first token is above this",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open connections at most; more get a 503 envelope (default 4096; not with vLLM in-process)",
    )
    serve.add_argument("--build-dir", type=Path, default=Path("build"), help="caches for the engine")
    serve.add_argument(
        "--tdx-provider",
        choices=["configfs", "dstack", "dstack-native"],
        default="configfs",
        help="with --tee tdx: quotes from the kernel's configfs-tsm or the dstack guest agent; "
        "dstack-native: the agent's quotes and log, our RTMR3 events through /dev/tdx_guest (dstack "
        "OS releases without EmitEvent)",
    )
    serve.add_argument(
        "--gpu-ready-gate",
        action="store_true",
        help="at boot, attest every GPU (and NVSwitch) locally for a fresh nonce and only then set the "
        "GPUs' confidential-computing ready state; refuse to start otherwise (recorded in RTMR3)",
    )
    serve.add_argument(
        "--expect-weights-root",
        metavar="HEX",
        help="refuse to start unless the model directory measures to this root",
    )
    serve.add_argument(
        "--image-digest",
        default=os.environ.get("TEE_INFERENCE_IMAGE_DIGEST"),
        help="digest of the image this runs in (set by the image build)",
    )
    serve.add_argument(
        "--tls",
        choices=["self-signed", "files", "dstack", "off"],
        help="TLS inside the serving process, its key made in the CVM and bound to the quote "
        "(default: self-signed with --tee tdx, off with --tee simulated)",
    )
    serve.add_argument(
        "--tls-name", action="append", default=[], metavar="NAME",
        help="DNS name or IP for the certificate / CSR (repeatable; default localhost, 127.0.0.1, ::1)",
    )  # fmt: skip
    serve.add_argument(
        "--tls-cert", type=Path, metavar="FILE",
        help="--tls files: the CA-issued chain for the server's CSR (GET /v1/tls/csr), reloaded on change",
    )  # fmt: skip
    serve.add_argument(
        "--tls-key", type=Path, metavar="FILE",
        help="--tls files: a key made outside the CVM (development only; refused with --tee tdx)",
    )  # fmt: skip
    serve.add_argument("--tls-dir", type=Path, metavar="DIR", help="RAM file system for the key files")
    serve.add_argument(
        "--insecure-plaintext", action="store_true",
        help="with --tee tdx: allow --tls off, sending every prompt across the host IN CLEAR",
    )  # fmt: skip
    serve.add_argument(
        "--simulated-compose",
        type=Path,
        metavar="FILE",
        help="with --tee simulated: the app-compose file the simulated dstack platform measures "
        "(MRCONFIGID, RTMR3 compose-hash), e.g. image/app-compose.json",
    )
    serve.add_argument(
        "--api-server-count", type=int, metavar="N",
        help="vLLM API processes (vLLM's --api-server-count): all sign with this boot's one key and share "
        "one signature store (the launcher's, or --redis); see docs/scale-out.md",
    )  # fmt: skip
    serve.add_argument(
        "--redis", metavar="URL",
        help="shared signature and usage store (redis://, rediss://, unix://): any process, node or "
        "gateway replica answers any id; records are verified when read back",
    )  # fmt: skip
    serve.add_argument(
        "--no-cache-isolation", action="store_true",
        help="do not give each tenant the gateway names (X-Tee-Tenant) its own prefix-cache salt",
    )  # fmt: skip
    add_key_options(serve)


def _served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return str(args.served_model_name)
    if args.model is None:
        return "fake-model"
    return Path(args.model).name or str(args.model)


def _fake_weights_root(args: argparse.Namespace) -> str | None:
    if args.engine != "fake" or args.upstream is not None:
        return None
    from tee_inference.engines.fake import FakeEngine

    return FakeEngine.weights_root()


def run(args: argparse.Namespace) -> int:
    try:
        from tee_inference.config import ServerConfig
        from tee_inference.server import ServeOptions, serve
    except ImportError as exc:  # the core install is the verifier alone
        raise ConfigError(
            f"serving needs the server extra ({exc.name} is missing): pip install 'tee-inference[server]'"
        ) from None

    if args.engine == "vllm" and args.upstream is None and args.model is None:
        raise ConfigError("--engine vllm needs --model (a model directory)")
    config = ServerConfig.build(
        tee=args.tee,
        key_source=args.key_source,
        key_file=args.key_file,
        key_epoch=args.key_epoch,
        api_key_env=args.api_key_env,
        signature_ttl_s=args.signature_ttl,
        max_inflight_completions=args.max_inflight_completions,
        max_ttft_s=args.max_ttft,
        max_connections=args.max_connections,
        # An --upstream engine may serve several models: without --model they are discovered.
        served_models=(_served_name(args),) if args.upstream is None or args.model else None,
        model_dir=Path(args.model) if args.model and Path(args.model).is_dir() else None,
        model_weights_root=args.expect_weights_root or _fake_weights_root(args),
        gpu_ready_gate=args.gpu_ready_gate or None,
        tdx_provider=args.tdx_provider,
        dstack_socket=args.dstack_socket,
        image_digest=args.image_digest,
        simulated_compose=args.simulated_compose,
        tls=args.tls or ("self-signed" if args.tee == "tdx" else "off"),
        tls_names=tuple(args.tls_name) or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_dir=args.tls_dir,
        insecure_plaintext=args.insecure_plaintext or None,
        api_server_count=args.api_server_count,
        redis_url=args.redis,
        cache_isolation=False if args.no_cache_isolation else None,
    )
    options = ServeOptions(
        config=config,
        engine=args.engine,
        upstream=args.upstream,
        model=args.model or _served_name(args),
        served_model_name=_served_name(args),
        host=args.host,
        port=args.port,
        proxy=args.proxy,
        engine_args=tuple(args.engine_arg),
        fake_token_delay_s=args.fake_token_delay,
        build_dir=args.build_dir,
    )
    return serve(options)
