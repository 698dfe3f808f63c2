"""Relays between a client and a server, as a host in the middle would run them.

``tls_terminating_relay`` ends TLS with its own certificate and opens its own TLS connection to
the server, so it can read everything: what TLS bound to the quote must expose. ``tcp_relay``
only forwards bytes: TLS still ends at the server, so a pinning client is not disturbed.

Both run an asyncio loop in a thread (asyncio's TLS streams are safe to read and write at once,
unlike one ssl.SSLSocket shared by two threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _relay_context(tmp: str) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay in the middle")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    with open(f"{tmp}/relay.pem", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(f"{tmp}/relay.pem")
    return context


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[bytes] | None) -> None:
    try:
        while data := await reader.read(65536):
            if seen is not None:
                seen.append(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextmanager
def _relay(
    upstream_port: int,
    *,
    front: ssl.SSLContext | None,
    back: ssl.SSLContext | None,
    seen: list[bytes] | None = None,
) -> Iterator[int]:
    loop = asyncio.new_event_loop()
    ready: list[int] = []
    started = threading.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port, ssl=back)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_copy(reader, up_writer, seen), _copy(up_reader, writer, seen))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=front)
        ready.append(server.sockets[0].getsockname()[1])
        started.set()
        async with server:
            await server.serve_forever()

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield ready[0]
    finally:
        for task in asyncio.all_tasks(loop):
            loop.call_soon_threadsafe(task.cancel)
        thread.join(5)


@contextmanager
def tcp_relay(upstream_port: int, seen: list[bytes] | None = None) -> Iterator[int]:
    """Forwards bytes; ``seen`` collects every byte that crossed it, both ways (what a host sees)."""
    with _relay(upstream_port, front=None, back=None, seen=seen) as port:
        yield port


@contextmanager
def tls_terminating_relay(upstream_port: int, tmp: str) -> Iterator[int]:
    back = ssl.create_default_context()
    back.check_hostname = False
    back.verify_mode = ssl.CERT_NONE
    with _relay(upstream_port, front=_relay_context(tmp), back=back) as port:
        yield port
