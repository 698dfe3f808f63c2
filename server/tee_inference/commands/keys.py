"""`tee-inference keys`: the public keys a key source produces (no private material)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tee_inference.commands import Subparsers


def add_key_options(parser: argparse.ArgumentParser) -> None:
    """Where the boot signing key comes from: shared by `serve` and `keys`."""
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


def add_parser(commands: Subparsers) -> None:
    keys = commands.add_parser(
        "keys", help="show the public keys a key source produces (no private material)"
    )
    add_key_options(keys)
    keys.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from tee_inference.config import ServerConfig
    from tee_inference.keys import load_signer, make_key_source

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
