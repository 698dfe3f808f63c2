"""Redis as the shared key-value store of ``shared_store.py`` (and the gateway's rate-limit counters).

One client per process, created lazily on the serving event loop (redis-py's asyncio pool binds
to the loop that first uses it). Every command has a short timeout: a Redis that hangs costs a
request its shared record, never the request. Errors surface as ``OSError`` so that the stores
above need no Redis types (the verifier installs without redis-py).

URLs: ``redis://host:6379/0``, ``rediss://…`` (TLS), ``unix:///run/redis.sock``. A password in
the URL is a secret on a command line: prefer a Redis on a private network or a local socket.
"""

from __future__ import annotations

from typing import Any, Final

_TIMEOUT_S: Final = 2.0


class RedisKV:
    def __init__(self, url: str, *, timeout_s: float = _TIMEOUT_S) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The redis.asyncio client (made on first use, on the loop that uses it)."""
        if self._client is None:
            import redis.asyncio

            self._client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )
        return self._client

    async def set_nx(self, key: str, value: bytes, ttl_s: float) -> bool:
        return bool(await self._call("set", key, value, nx=True, px=max(1, int(ttl_s * 1000))))

    async def get(self, key: str) -> bytes | None:
        value = await self._call("get", key)
        return bytes(value) if value is not None else None

    async def incr_window(self, key: str, window_s: int) -> int:
        """Count one more event in a fixed window (created with its expiry); the new count."""
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, window_s, nx=True)
        try:
            count, _ = await pipe.execute()
        except Exception as exc:
            raise _unavailable(exc) from None
        return int(count)

    async def xadd(self, stream: str, fields: dict[str, str], maxlen: int) -> str:
        value = await self._call("xadd", stream, fields, maxlen=maxlen, approximate=True)
        return value.decode() if isinstance(value, bytes) else str(value)

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self.client, name)(*args, **kwargs)
        except Exception as exc:
            raise _unavailable(exc) from None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _unavailable(exc: Exception) -> OSError:
    # The message of a redis error can carry the URL (with its password): only the type travels.
    return OSError(f"redis unavailable ({type(exc).__name__})")
