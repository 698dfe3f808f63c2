"""The store of one node's vLLM API processes, held by the launcher: no Redis inside the CVM needed.

With `--api-server-count N` vLLM runs N API processes; a completion is signed by whichever served
it, and `GET /v1/signature/{id}` may reach any of them. They all sign with one key already (each
resumes the launcher's boot, `handoff.py`); this gives them one store. The launcher, which waits
for vLLM anyway, keeps a bounded in-memory key-value store and serves it on a Linux abstract
Unix socket named in the configuration (`node_store`), like the boot handoff: no file, no disk,
answered only for processes of the launcher's own user (SO_PEERCRED). Each API process writes
through its own memory and reads misses here (``shared_store.SharedSignatureStore``).

Why not a local redis-server: one more daemon and binary in the measured image, for what a
dictionary behind a socket does; with `--redis` the processes use that Redis instead.

    request   op(1: b"S" set-if-absent | b"G" get) ‖ u16be key length ‖ key ‖ u32be ttl ms
              ‖ u32be value length ‖ value                              (get: ttl 0, no value)
    answer    status(1: 1 stored / found, 0 not) ‖ u32be value length ‖ value
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from typing import Final

import anyio
import anyio.abc

log = logging.getLogger("tee_inference.nodestore")

_HEAD: Final = struct.Struct(">cH")
_TTL_LEN: Final = struct.Struct(">II")
_ANSWER: Final = struct.Struct(">BI")
_MAX_KEY: Final = 512
_MAX_VALUE: Final = 64 << 10  # a record is a few hundred bytes; anything larger is not ours
_TIMEOUT_S: Final = 5.0


class BoundedKV:
    """Expiring byte records, bounded in count and bytes; the oldest expiry goes first."""

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._records: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def set_nx(self, key: str, value: bytes, ttl_s: float) -> bool:
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            if key in self._records:
                return False
            self._records[key] = (now + ttl_s, value)
            self._bytes += len(key) + len(value)
            while len(self._records) > self.max_entries or self._bytes > self.max_bytes:
                self._drop_oldest()
            return True

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._records.get(key)
            if entry is None or entry[0] <= time.monotonic():
                return None
            return entry[1]

    def _expire(self, now: float) -> None:
        # Records share one ttl per kind, so the front is (nearly) the next to expire.
        while self._records and next(iter(self._records.values()))[0] <= now:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        key, (_, value) = self._records.popitem(last=False)
        self._bytes -= len(key) + len(value)


class NodeStoreServer:
    """The launcher's side: serves a ``BoundedKV`` to this user's processes until closed."""

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self.kv = BoundedKV(max_entries=max_entries, max_bytes=max_bytes)
        self.name = f"tee-inference-store-{secrets.token_hex(16)}"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind("\0" + self.name)
        self._socket.listen(64)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="node-store", daemon=True)
        self._connections: set[socket.socket] = set()

    def start(self) -> NodeStoreServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):  # not connected: nothing to wake
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> NodeStoreServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return  # closed
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", creds)
            if uid != os.getuid():
                log.warning("node store refused to pid %d of uid %d", pid, uid)
                conn.close()
                continue
            # One thread per API process (a handful), each holding one connection for its lifetime.
            threading.Thread(target=self._serve, args=(conn,), name="node-store-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        self._connections.add(conn)
        with conn:
            try:
                while not self._closed.is_set():
                    head = _recv(conn, _HEAD.size)
                    if head is None:
                        return
                    op, key_len = _HEAD.unpack(head)
                    if key_len > _MAX_KEY:
                        return  # not one of ours: drop the connection
                    key = _recv_exactly(conn, key_len).decode("utf-8")
                    ttl_ms, value_len = _TTL_LEN.unpack(_recv_exactly(conn, _TTL_LEN.size))
                    if value_len > _MAX_VALUE:
                        return
                    value = _recv_exactly(conn, value_len)
                    if op == b"S":
                        ok, answer = self.kv.set_nx(key, value, ttl_ms / 1000), b""
                    else:
                        found = self.kv.get(key)
                        ok, answer = found is not None, found or b""
                    conn.sendall(_ANSWER.pack(int(ok), len(answer)) + answer)
            except (OSError, UnicodeDecodeError, EOFError) as exc:
                log.debug("node store connection ended: %s", type(exc).__name__)
            finally:
                self._connections.discard(conn)


def _recv(conn: socket.socket, size: int) -> bytes | None:
    first = conn.recv(size)
    if not first:
        return None
    return first + _recv_exactly(conn, size - len(first)) if len(first) < size else first


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


class NodeStoreClient:
    """An API process's side (``shared_store.SharedKV``): one connection, one request at a time.

    Each request is a round trip on a local socket (tens of microseconds); one per completion is
    stored and one per signature lookup that this process did not sign itself.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._stream: anyio.abc.ByteStream | None = None
        self._lock: anyio.Lock | None = None

    async def set_nx(self, key: str, value: bytes, ttl_s: float) -> bool:
        ok, _ = await self._request(b"S", key, max(1, int(ttl_s * 1000)), value)
        return ok

    async def get(self, key: str) -> bytes | None:
        ok, value = await self._request(b"G", key, 0, b"")
        return value if ok else None

    async def _request(self, op: bytes, key: str, ttl_ms: int, value: bytes) -> tuple[bool, bytes]:
        raw_key = key.encode("utf-8")
        if len(raw_key) > _MAX_KEY or len(value) > _MAX_VALUE:
            raise OSError("node store record too large")
        frame = _HEAD.pack(op, len(raw_key)) + raw_key + _TTL_LEN.pack(ttl_ms, len(value)) + value
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            for attempt in (1, 2):  # a launcher restart or a dropped connection: reconnect once
                try:
                    with anyio.fail_after(_TIMEOUT_S):
                        if self._stream is None:
                            self._stream = await anyio.connect_unix("\0" + self.name)
                        await self._stream.send(frame)
                        status, length = _ANSWER.unpack(await self._receive(_ANSWER.size))
                        return bool(status), await self._receive(length)
                except (OSError, anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError) as exc:
                    await self._drop()
                    if attempt == 2:
                        raise OSError(f"node store unavailable ({type(exc).__name__})") from None
        raise AssertionError("unreachable")

    async def _receive(self, size: int) -> bytes:
        assert self._stream is not None
        data = bytearray()
        while len(data) < size:
            data += await self._stream.receive(size - len(data))
        return bytes(data)

    async def _drop(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.aclose()
            self._stream = None
