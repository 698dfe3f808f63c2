"""The `tee-inference` command: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tee_inference import __version__
from tee_inference.bench import add_bench_parser
from tee_inference.boot import StartRefused
from tee_inference.config import ConfigError, ServerConfig
from tee_inference.keys import KeySourceError
from tee_inference.measure_cli import add_measure_parser
from tee_inference.verify.cli import add_verify_parser


def _add_key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-source",
        choices=["random", "file", "dstack"],
        default="random",
        help="where the boot signing key comes from (default: random per boot)",
    )
    parser.add_argument(
        "--key-file", type=Path, help="64 hex chars; development only, refused with --tee tdx"
    )
    parser.add_argument("--key-epoch", type=int, default=1, help="key epoch mixed into the derivation")
    parser.add_argument(
        "--dstack-socket", type=Path, help="dstack guest agent socket (default /var/run/dstack.sock)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tee-inference",
        description="Signed, attested OpenAI-compatible inference for TDX confidential VMs.",
    )
    parser.add_argument("--version", action="version", version=f"tee-inference {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

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
    serve.add_argument("--build-dir", type=Path, default=Path("build"), help="caches for the engine")
    serve.add_argument(
        "--tdx-provider",
        choices=["configfs", "dstack"],
        default="configfs",
        help="with --tee tdx: quotes from the kernel's configfs-tsm or the dstack guest agent",
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
    _add_key_options(serve)

    add_bench_parser(commands)
    add_verify_parser(commands)
    add_measure_parser(commands)

    keys = commands.add_parser(
        "keys", help="show the public keys a key source produces (no private material)"
    )
    _add_key_options(keys)
    keys.add_argument("--json", action="store_true")
    return parser


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


def _cmd_serve(args: argparse.Namespace) -> int:
    from tee_inference.server import ServeOptions, serve

    if args.engine == "vllm" and args.upstream is None and args.model is None:
        print("tee-inference: --engine vllm needs --model (a model directory)", file=sys.stderr)
        return 2
    config = ServerConfig.build(
        tee=args.tee,
        key_source=args.key_source,
        key_file=args.key_file,
        key_epoch=args.key_epoch,
        api_key_env=args.api_key_env,
        signature_ttl_s=args.signature_ttl,
        # An --upstream engine may serve several models: without --model they are discovered.
        served_models=(_served_name(args),) if args.upstream is None or args.model else None,
        model_dir=Path(args.model) if args.model and Path(args.model).is_dir() else None,
        model_weights_root=args.expect_weights_root or _fake_weights_root(args),
        tdx_provider=args.tdx_provider,
        dstack_socket=args.dstack_socket,
        image_digest=args.image_digest,
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


def _cmd_keys(args: argparse.Namespace) -> int:
    from tee_inference.keys import load_signer
    from tee_inference.services import make_key_source

    config = ServerConfig.build(
        key_source=args.key_source,
        key_file=args.key_file,
        key_epoch=args.key_epoch,
        dstack_socket=args.dstack_socket,
    )
    signer = load_signer(make_key_source(config), config.key_epoch)
    info = {
        "key_source": config.key_source,
        "epoch": signer.epoch,
        "signing_address": signer.ecdsa.address,
        "ecdsa_public_key": signer.ecdsa.public_key.hex(),
        "ed25519_public_key": signer.ed25519.public_key.hex(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:20} {value}")
        if config.key_source == "random":
            print("(random: a new key every boot; this one was made only to be shown)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: noise for the CLI, and URLs carry nonces.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "keys":
            return _cmd_keys(args)
        if args.command == "verify":
            from tee_inference.verify.cli import run_verify

            return run_verify(args)
        if args.command == "measure":
            from tee_inference.measure_cli import run_measure

            return run_measure(args)
        if args.command == "bench":
            from tee_inference.bench import run_bench

            return run_bench(args)
    except (ConfigError, KeySourceError) as exc:
        print(f"tee-inference: {exc}", file=sys.stderr)
        return 2
    except StartRefused as exc:
        for reason in exc.reasons:
            print(f"tee-inference: refusing to start: {reason}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
