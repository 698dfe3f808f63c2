"""`tee-inference gateway`: many attested nodes behind one endpoint (docs/gateway.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tee_inference.commands import Subparsers
from tee_inference.exceptions import ConfigError


def add_parser(commands: Subparsers) -> None:
    gw = commands.add_parser(
        "gateway",
        help="route to attested nodes only: verify each before it gets traffic, re-verify, forward bytes",
    )
    gw.add_argument(
        "--node", action="append", required=True, metavar="URL", help="a node's base URL (repeat)"
    )
    gw.add_argument(
        "--expect", action="append", default=[], type=Path, metavar="FILE",
        help="expected-measurements file every node must satisfy (repeat: any one of them)",
    )  # fmt: skip
    gw.add_argument("--allow-simulated", action="store_true", help="accept SIMULATED nodes (testing only)")
    gw.add_argument(
        "--no-measurements",
        action="store_true",
        help="accept nodes without comparing measurements (reported)",
    )
    gw.add_argument(
        "--allow-plaintext", action="store_true",
        help="accept http:// nodes (loopback development: nothing binds the connection to the node)",
    )  # fmt: skip
    gw.add_argument(
        "--allow-missing-collateral", action="store_true", help="accept nodes whose TCB cannot be checked"
    )
    gw.add_argument("--pccs-url", metavar="URL", help="fetch Intel collateral from this PCCS (TCB status)")
    gw.add_argument(
        "--redis", metavar="URL",
        help="shared store: signatures of any node from any replica, shared rate limits, the usage stream",
    )  # fmt: skip
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8080)
    gw.add_argument(
        "--node-api-key-env", metavar="VAR", help="send 'Authorization: Bearer $VAR' to the nodes"
    )
    gw.add_argument(
        "--keys", type=Path, metavar="FILE",
        help='API keys: {"keys": [{"name", "sha256", "requests_per_minute"}]} (default: any caller)',
    )  # fmt: skip
    gw.add_argument("--rate-limit", type=int, metavar="N", help="requests per minute per key (default 600)")
    gw.add_argument(
        "--sticky", action="store_true",
        help="keep a caller on one node (X-Tee-Affinity, else its key) for prefix-cache reuse",
    )  # fmt: skip
    gw.add_argument("--reverify", type=float, metavar="SECONDS", help="full re-verification period (300)")
    gw.add_argument("--probe", type=float, metavar="SECONDS", help="identity probe period (5)")
    gw.add_argument(
        "--outbox", type=Path, metavar="FILE", help="durable usage outbox (default gateway-outbox.sqlite3)"
    )
    gw.add_argument(
        "--usage-log", type=Path, metavar="FILE", help="usage records as JSON lines (without --redis)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from tee_inference.config import ServerConfig
        from tee_inference.gateway.app import GatewayApp
        from tee_inference.gateway.config import GatewayConfig
        from tee_inference.transport import uvicorn_options
    except ImportError as exc:
        raise ConfigError(
            f"the gateway needs the server extra ({exc.name} is missing): pip install 'tee-inference[server]'"
        ) from None
    config = GatewayConfig.build(
        nodes=tuple(args.node), expect=tuple(args.expect), allow_simulated=args.allow_simulated or None,
        no_measurements=args.no_measurements or None, allow_plaintext=args.allow_plaintext or None,
        allow_missing_collateral=args.allow_missing_collateral or None, pccs_url=args.pccs_url,
        redis_url=args.redis, host=args.host, port=args.port, node_api_key_env=args.node_api_key_env,
        keys_file=args.keys, requests_per_minute=args.rate_limit, sticky=args.sticky or None,
        reverify_s=args.reverify, probe_s=args.probe, outbox=args.outbox, usage_log=args.usage_log,
    )  # fmt: skip
    app = GatewayApp(config)
    print(
        f"\ntee-inference gateway at http://{config.host}:{config.port} for {len(config.nodes)} node(s); "
        "a node gets traffic only once it verifies (GET /health, /metrics)\n",
        flush=True,
    )
    server = uvicorn.Config(
        app, host=config.host, port=config.port, lifespan="on", server_header=False, access_log=False,
        log_level="info", **uvicorn_options(ServerConfig()),
    )  # fmt: skip
    uvicorn.Server(server).run()
    return 0
