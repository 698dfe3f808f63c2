"""Admission control: what the server takes on before the engine sees it.

Two bounds decide whether a completion is taken now or shed with 429 and `Retry-After` (the
OpenAI SDK waits and retries): completions in flight, and the engine's recent time to first
token (TTFT). The TTFT bound sheds *before* the engine's queue grows past what a client would
wait for; it is an exponentially weighted average of recent streams' first tokens, forgotten
after `window_s` without observations, and it never refuses a request while nothing is in
flight, so the estimate always recovers. A third bound caps the request-body bytes held across
all connections at once, so many slow uploads cannot take the memory of the enclave.

One instance per serving process (in `Services`); single-threaded on the event loop, so plain
integers suffice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

Shed = Literal["inflight", "ttft"]

_TTFT_WEIGHT = 0.3  # of a new observation in the average: a few slow streams are enough to act


class AdmissionControl:
    def __init__(
        self,
        *,
        max_inflight: int,
        max_ttft_s: float | None,
        max_body_bytes: int = 1 << 62,
        window_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_inflight = max_inflight
        self.max_ttft_s = max_ttft_s
        self.max_body_bytes = max_body_bytes
        self.window_s = window_s
        self._clock = clock
        self.inflight = 0
        self.inflight_body_bytes = 0
        self._ttft: float | None = None
        self._ttft_at = 0.0

    def admit(self) -> Shed | None:
        """Take one completion (None), or say which bound sheds it; `release` each one taken."""
        if self.inflight >= self.max_inflight:
            return "inflight"
        if self.inflight > 0 and self.max_ttft_s is not None and self.ttft_estimate() > self.max_ttft_s:
            return "ttft"
        self.inflight += 1
        return None

    def release(self) -> None:
        self.inflight -= 1

    def observe_first_token(self, seconds: float) -> None:
        self._ttft = (
            seconds if self._ttft is None else (1 - _TTFT_WEIGHT) * self._ttft + _TTFT_WEIGHT * seconds
        )
        self._ttft_at = self._clock()

    def ttft_estimate(self) -> float:
        if self._ttft is None or self._clock() - self._ttft_at > self.window_s:
            return 0.0
        return self._ttft

    def retry_after_s(self) -> int:
        """Whole seconds a shed client should wait: about one first token's time, 1 to 60."""
        return min(60, max(1, math.ceil(self.ttft_estimate())))

    def reserve_body(self, size: int) -> bool:
        """Count `size` more request-body bytes held; False (nothing counted) past the bound."""
        if self.inflight_body_bytes + size > self.max_body_bytes:
            return False
        self.inflight_body_bytes += size
        return True

    def release_body(self, size: int) -> None:
        self.inflight_body_bytes -= size
