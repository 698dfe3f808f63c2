"""Per-key rate limits: requests per minute, in fixed one-minute windows.

With Redis the counters are shared by every gateway replica (INCR on a key that expires with its
window); without, each replica counts alone. The answer carries the IETF draft's headers on every
completion, and a refusal is 429 with ``Retry-After`` (the OpenAI SDK waits and retries)::

    X-RateLimit-Limit: 600        X-RateLimit-Remaining: 599        X-RateLimit-Reset: 37
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tee_inference.gateway.config import Caller
from tee_inference.redis_kv import RedisKV

log = logging.getLogger("tee_inference.gateway.limits")

WINDOW_S: Final = 60


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-ratelimit-limit", str(self.limit).encode("ascii")),
            (b"x-ratelimit-remaining", str(self.remaining).encode("ascii")),
            (b"x-ratelimit-reset", str(self.reset_s).encode("ascii")),
        ]


class RateLimiter:
    def __init__(self, redis: RedisKV | None = None, clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self._clock = clock
        self._counts: dict[tuple[str, int], int] = {}

    async def hit(self, caller: Caller) -> Verdict:
        """Count one request of ``caller`` in the current window; whether it may go on."""
        now = self._clock()
        window = int(now // WINDOW_S)
        name = caller.tenant or "anonymous"
        count = await self._count(name, window)
        limit = caller.requests_per_minute
        reset = max(1, int((window + 1) * WINDOW_S - now))
        return Verdict(count <= limit, limit, max(0, limit - count), reset)

    async def _count(self, name: str, window: int) -> int:
        if self.redis is not None:
            try:
                return await self.redis.incr_window(f"tee-inference:rl:{name}:{window}", WINDOW_S)
            except OSError as exc:
                # A shared counter that cannot be reached: count here rather than refuse everyone.
                log.warning("rate-limit counters unreachable: %s; counting locally", exc)
        if len(self._counts) > 100_000 or any(w < window for _, w in list(self._counts)[:1]):
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= window}
        key = (name, window)
        self._counts[key] = self._counts.get(key, 0) + 1
        return self._counts[key]
