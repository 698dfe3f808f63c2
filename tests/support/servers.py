"""Running an ASGI app on a real socket for the duration of a test."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from tee_inference.asgi import ASGIApp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(
    app: ASGIApp,
    *,
    uds: Path | None = None,
    lifespan: str = "on",
    port: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
    **options: Any,
) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port (or a Unix socket); yields its URL.

    With ``ssl_context`` it serves TLS (the server's own context, as `serve --tls` builds it);
    `options` go to `uvicorn.Config` (for instance `http=` a protocol class, `limit_concurrency`).
    """
    if uds is None:
        port = port or free_port()
        factory = (lambda config, default: ssl_context) if ssl_context is not None else None
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan=lifespan,
            log_level="warning",
            ssl_context_factory=factory,
            **options,
        )
        url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    else:
        config = uvicorn.Config(app, uds=str(uds), lifespan=lifespan, log_level="warning", **options)
        url = f"unix:{uds}"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"test server did not start at {url}")
        time.sleep(0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
