#!/usr/bin/env python3
"""Container health check: ``GET /health`` over TLS on this container's own port; exit 0 if 200.

A liveness probe, not a trust decision: it talks to 127.0.0.1 inside the container, so it does
not verify the certificate (which names the public host, or is self-signed and pinned by clients
through the attestation report). Standard library only, so it runs before and whatever the wheels
install.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="healthcheck")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--plaintext", action="store_true", help="http instead of https (--tls off)")
    args = parser.parse_args(argv)
    scheme = "http" if args.plaintext else "https"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(  # noqa: S310
            f"{scheme}://127.0.0.1:{args.port}/health", timeout=5, context=context
        ) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
