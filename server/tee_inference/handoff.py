"""Handing one boot to the vLLM API processes: a private socket that serves the boot state.

`tee-inference serve --engine vllm` boots once, in the launcher (checks, key, weights, RTMR3
events), then starts vLLM with our middleware inside it. vLLM's API processes (one, or several
with `--api-server-count`) are spawned by vLLM, so no descriptor of ours survives into them; each
asks the launcher instead, over a Linux abstract-namespace Unix socket whose random name is in
`TEE_INFERENCE_BOOT_HANDOFF`:

    launcher                                     vLLM API process (SigningMiddleware)
    boot() → BootState                           connect(\\0tee-inference-boot-<random>)
    serve: accept, SO_PEERCRED uid == ours  ──▶  u32be length ‖ BootState JSON
                                                 resume(config, state) → Services

The state (root secret included) never touches a file system: the socket has no file, and the
bytes live only in the two processes' memory. Only processes of the launcher's own user are
answered; inside the CVM that is the image's own software, which could read the launcher's
memory anyway. Every process resumes the same secret, so all of them sign with one key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
import threading
from collections.abc import Mapping
from typing import Final

from tee_inference.boot import resume
from tee_inference.boot_state import BootState
from tee_inference.config import ServerConfig
from tee_inference.exceptions import ConfigError, TrustRootError
from tee_inference.services import Services

log = logging.getLogger("tee_inference.handoff")

HANDOFF_ENV: Final = "TEE_INFERENCE_BOOT_HANDOFF"
_LENGTH: Final = struct.Struct(">I")
_MAX_STATE: Final = 16 << 20  # runtime events are few and small; anything larger is not ours
_TIMEOUT_S: Final = 10.0


class HandoffServer:
    """Serves one boot state to processes of this user until closed (a daemon thread)."""

    def __init__(self, state: BootState) -> None:
        self._payload = state.to_json()
        self.name = f"tee-inference-boot-{secrets.token_hex(16)}"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind("\0" + self.name)
        self._socket.listen(16)
        self._thread = threading.Thread(target=self._serve, name="boot-handoff", daemon=True)
        self._closed = threading.Event()

    def start(self) -> HandoffServer:
        self._thread.start()
        return self

    def env(self) -> dict[str, str]:
        return {HANDOFF_ENV: self.name}

    def close(self) -> None:
        self._closed.set()
        # shutdown wakes the accept(); close alone does not on Linux.
        with contextlib.suppress(OSError):  # not connected: nothing to wake
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()

    def __enter__(self) -> HandoffServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    self._answer(conn)
                except OSError as exc:
                    log.warning("boot handoff to a process failed: %s", exc.strerror or exc)

    def _answer(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            log.warning("boot handoff refused to pid %d of uid %d", pid, uid)
            return
        conn.settimeout(_TIMEOUT_S)
        conn.sendall(_LENGTH.pack(len(self._payload)) + self._payload)
        log.info("boot handed to process %d", pid)


def receive_state(name: str) -> BootState:
    """The boot state from the launcher's handoff socket ``name``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_TIMEOUT_S)
        try:
            sock.connect("\0" + name)
            header = _recv_exactly(sock, _LENGTH.size)
            (length,) = _LENGTH.unpack(header)
            if length > _MAX_STATE:
                raise TrustRootError(f"boot handoff announced {length} bytes, more than any boot state")
            return BootState.from_json(_recv_exactly(sock, length))
        except OSError as exc:
            raise TrustRootError(
                f"no boot handoff from the launcher ({HANDOFF_ENV}={name}): {exc.strerror or exc}"
            ) from None


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 16))
        if not chunk:
            raise TrustRootError(f"boot handoff closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def services_for_process(config: ServerConfig, environ: Mapping[str, str] | None = None) -> Services:
    """The services of this serving process: resumed from the launcher's boot, or booted here.

    Booting here is for a vLLM started by hand with our middleware (no launcher); it runs the
    whole boot, checks included.
    """
    env = os.environ if environ is None else environ
    name = env.get(HANDOFF_ENV)
    if name:
        return resume(config, receive_state(name))
    if config.tls != "off":
        # The report would bind a TLS key made here, while the certificate vLLM serves was given
        # to it by hand: only the launcher hands the same key to both.
        raise ConfigError(
            f"--tls {config.tls} needs the launcher to hand vLLM the attested key: "
            "start with tee-inference serve"
        )
    from tee_inference.boot import boot

    return boot(config)
