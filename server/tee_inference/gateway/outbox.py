"""Usage records, written durably before they are reported: an outbox that survives a restart.

Every completion the gateway forwards leaves one row, committed to SQLite (WAL, synchronous=FULL)
when the exchange ends and before anything is reported. A reporter then, for each row:

1. fetches the node's *signed* usage for it (``GET /v1/usage/<ref>`` on the node that served it,
   the ref the gateway sent in ``X-Tee-Usage-Ref``: it works for encrypted bodies the gateway
   cannot read) and checks the signature against the key that node was verified with. A node that
   has none within ``usage_wait_s`` leaves the row with ``usage: null`` (reported as unavailable);
2. appends the record to the sink (a Redis stream ``tee-inference:usage`` with ``--redis``, else a
   JSON-lines file, fsynced) and only then marks the row reported.

A crash between 2's append and its mark reports that record again on restart: delivery is at least
once, and ``ref`` is the idempotency key for whoever consumes the sink.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import httpx

from tee_inference.redis_kv import RedisKV
from tee_inference.verify.usage import verify_usage

log = logging.getLogger("tee_inference.gateway.outbox")

STREAM: Final = "tee-inference:usage"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    ref TEXT PRIMARY KEY, created REAL NOT NULL, tenant TEXT, model TEXT, node TEXT NOT NULL,
    node_address TEXT NOT NULL, status INTEGER NOT NULL,
    stream INTEGER NOT NULL, encrypted INTEGER NOT NULL, usage TEXT, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL)
"""


@dataclass(frozen=True)
class Exchange:
    """One forwarded completion, as the gateway saw it (never its content)."""

    ref: str
    tenant: str | None
    model: str
    node: str
    node_address: str
    status: int
    stream: bool
    encrypted: bool


class Outbox:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()
        self.wake = anyio.Event()

    async def record(self, exchange: Exchange) -> None:
        """Commit the row; returns once it is durable."""
        await anyio.to_thread.run_sync(self._insert, exchange)
        self.wake.set()

    def _insert(self, e: Exchange) -> None:
        state = "pending" if e.status == 200 else "ready"  # an error consumed nothing to sign
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO outbox (ref, created, tenant, model, node, node_address, status, "
                "stream, encrypted, state, next_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    e.ref,
                    self._clock(),
                    e.tenant,
                    e.model,
                    e.node,
                    e.node_address,
                    e.status,
                    int(e.stream),
                    int(e.encrypted),
                    state,
                    0.0,
                ),
            )

    def rows(self, state: str, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._db.execute(
                "SELECT * FROM outbox WHERE state = ? AND next_at <= ? ORDER BY created LIMIT ?",
                (state, self._clock(), limit),
            )
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def count(self, state: str) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = ?", (state,)).fetchone()[0]
            )

    def update(self, ref: str, **fields: object) -> None:
        names = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE outbox SET {names} WHERE ref = ?", (*fields.values(), ref))  # noqa: S608

    def close(self) -> None:
        with self._lock:
            self._db.close()


class UsageSink:
    """Where reported records go: a Redis stream, or a JSON-lines file (fsynced per batch)."""

    def __init__(self, redis: RedisKV | None, path: Path | None) -> None:
        self.redis, self.path = redis, path

    async def write(self, records: list[dict[str, Any]]) -> None:
        if self.redis is not None:
            for record in records:
                await self.redis.xadd(
                    STREAM, {"record": json.dumps(record, separators=(",", ":"))}, 1_000_000
                )
            return
        if self.path is not None:
            await anyio.to_thread.run_sync(self._append, records)

    def _append(self, records: list[dict[str, Any]]) -> None:
        assert self.path is not None
        with self.path.open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())


class Reporter:
    """Attaches each row's signed usage, then reports it; runs for the gateway's lifetime."""

    def __init__(
        self,
        outbox: Outbox,
        sink: UsageSink,
        client_for: Callable[[str], httpx.AsyncClient | None],
        *,
        wait_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox, self.sink, self.client_for = outbox, sink, client_for
        self.wait_s = wait_s
        self._clock = clock
        self.reported = 0

    async def run(self) -> None:
        while True:
            await self.step()
            self.outbox.wake = anyio.Event()
            with anyio.move_on_after(0.5):
                await self.outbox.wake.wait()

    async def step(self) -> None:
        """One pass: fetch what is pending, report what is ready."""
        for row in await anyio.to_thread.run_sync(self.outbox.rows, "pending"):
            await self._attach(row)
        ready = await anyio.to_thread.run_sync(self.outbox.rows, "ready")
        if not ready:
            return
        try:
            await self.sink.write([report_record(row) for row in ready])
        except OSError as exc:
            log.warning("usage sink unavailable (%s): %d record(s) stay in the outbox", exc, len(ready))
            return
        for row in ready:
            await anyio.to_thread.run_sync(
                functools.partial(self.outbox.update, row["ref"], state="reported")
            )
        self.reported += len(ready)

    async def _attach(self, row: dict[str, Any]) -> None:
        usage = await self._fetch(row)
        fields: dict[str, object]
        if usage is not None:
            fields = {"usage": json.dumps(usage, separators=(",", ":")), "state": "ready"}
        elif self._clock() - row["created"] > self.wait_s:
            fields = {"state": "ready"}  # reported with usage null: the node never had it
        else:
            attempts = int(row["attempts"]) + 1
            fields = {"attempts": attempts, "next_at": self._clock() + min(5.0, 0.1 * 2**attempts)}
        await anyio.to_thread.run_sync(functools.partial(self.outbox.update, row["ref"], **fields))

    async def _fetch(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """The node's signed usage for the row, checked against the key the node was verified with."""
        client = self.client_for(row["node"])
        if client is None:
            return None
        try:
            response = await client.get(f"/v1/usage/{row['ref']}", timeout=10.0)
            record = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(record, dict):
            return None
        usage, _ = verify_usage(record, address=row["node_address"])
        if usage is None:
            log.warning("node %s answered usage its verified key did not sign: not attached", row["node"])
            return None
        return {
            "id": usage.completion_id,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "source": usage.source,
            "usage_text": usage.text,
            "usage_signature": record["usage_signature"],
        }


def report_record(row: dict[str, Any]) -> dict[str, Any]:
    """What the sink receives: the exchange, and the node's signed usage (or null) to prove it:
    ``usage.usage_signature`` is the node's EIP-191 signature of ``usage.usage_text`` by
    ``signing_address`` (check it with `tee-inference verify usage`)."""
    usage = json.loads(row["usage"]) if row.get("usage") else None
    return {
        "ref": row["ref"],
        "created": row["created"],
        "tenant": row["tenant"],
        "model": row["model"],
        "node": row["node"],
        "signing_address": row["node_address"],
        "status": row["status"],
        "stream": bool(row["stream"]),
        "encrypted": bool(row["encrypted"]),
        "usage": usage,
    }
