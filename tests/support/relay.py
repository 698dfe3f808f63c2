"""Relays between a client and a server, as a host in the middle would run them.

``tls_terminating_relay`` ends TLS with its own certificate and opens its own TLS connection to
the server, so it can read everything: what TLS bound to the quote must expose. ``tcp_relay``
only forwards bytes: TLS still ends at the server, so a pinning client is not disturbed.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _relay_certificate(tmp: str) -> ssl.SSLContext:
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


@contextmanager
def _serve(handle: object) -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()  # type: ignore[arg-type]

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        listener.close()


@contextmanager
def tcp_relay(upstream_port: int) -> Iterator[int]:
    def handle(conn: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", upstream_port))
        threading.Thread(target=_pipe, args=(conn, up), daemon=True).start()
        _pipe(up, conn)

    with _serve(handle) as port:
        yield port


@contextmanager
def tls_terminating_relay(upstream_port: int, tmp: str) -> Iterator[int]:
    server_side = _relay_certificate(tmp)
    client_side = ssl.create_default_context()
    client_side.check_hostname = False
    client_side.verify_mode = ssl.CERT_NONE

    def handle(conn: socket.socket) -> None:
        try:
            front = server_side.wrap_socket(conn, server_side=True)
            back = client_side.wrap_socket(socket.create_connection(("127.0.0.1", upstream_port)))
        except OSError:
            conn.close()
            return
        threading.Thread(target=_pipe, args=(front, back), daemon=True).start()
        _pipe(back, front)

    with _serve(handle) as port:
        yield port
