"""Attestation reports (SPEC §3): a TDX quote binding key and nonce, GPU evidence, event log.

Collection talks to the kernel, a socket or NVML and can take seconds, so it runs in
worker threads, never on the event loop. Identical concurrent requests share one
collection; a caller's nonce is only ever answered with a report for that nonce; reports
for a server-chosen nonce may be reused for a short time.

A trust root that fails, hangs or times out (an NVML init that never returns) costs one
report a 503 within `collection_timeout_s`, never the event loop or the completions: the
hung thread is abandoned, and at most `max_threads` of them may be outstanding before further
reports are refused at once instead of piling up threads.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from tee_inference.attestation.report import AttestationReport
from tee_inference.attestation.report_data import report_data_for, report_data_for_tls
from tee_inference.exceptions import TeeInferenceError, TrustRootError
from tee_inference.keys import BootKeys
from tee_inference.signing import SIGNING_ALGOS, SigningAlgo
from tee_inference.tee import GpuProvider, TdxProvider

log = logging.getLogger("tee_inference.reports")

_NONCE = re.compile(r"[0-9a-fA-F]{64}")


class ReportBusy(TeeInferenceError):
    """Too many distinct reports are being collected at once."""


@dataclass
class _Flight:
    done: anyio.Event
    result: AttestationReport | None = None
    error: BaseException | None = None


class AttestationService:
    def __init__(
        self,
        *,
        tdx: TdxProvider,
        gpu: GpuProvider,
        keys: BootKeys,
        info: dict[str, Any],
        server_nonce_ttl_s: float = 30.0,
        max_concurrent_collections: int = 4,
        max_pending: int = 256,
        collection_timeout_s: float = 20.0,
        max_threads: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tdx = tdx
        self.gpu = gpu
        self.keys = keys
        self.info = info
        self.server_nonce_ttl_s = server_nonce_ttl_s
        self.max_pending = max_pending
        self._clock = clock
        self._limiter = anyio.CapacityLimiter(max_concurrent_collections)
        self.collection_timeout_s = collection_timeout_s
        # Taken by each collecting thread and given back when that thread ends, even after its
        # caller gave up on it: what bounds the threads a hanging trust root can hold.
        self._threads = threading.BoundedSemaphore(max_threads)
        self._flights: dict[tuple[bytes | None, SigningAlgo, bool], _Flight] = {}
        self._cached: dict[tuple[SigningAlgo, bool], tuple[float, AttestationReport]] = {}

    async def report(
        self, nonce: bytes | None, algo: SigningAlgo, *, tls_layout: bool = False
    ) -> AttestationReport:
        """The report for `nonce` (None: a server-chosen one, possibly a recent one).

        ``tls_layout`` binds the TLS key into report_data as nearai's verifier expects:
        ``sha256(key identity ‖ SPKI sha256) ‖ nonce`` (needs TLS to be on).
        """
        if algo not in SIGNING_ALGOS:
            raise ValueError(f"signing_algo must be one of {', '.join(SIGNING_ALGOS)}")
        if tls_layout and self.keys.tls is None:
            raise ValueError("this server serves no TLS (--tls off): there is no fingerprint to include")
        if nonce is None:
            cached = self._cached.get((algo, tls_layout))
            if cached is not None and self._clock() - cached[0] < self.server_nonce_ttl_s:
                return cached[1]
        key = (nonce, algo, tls_layout)
        flight = self._flights.get(key)
        if flight is None:
            if len(self._flights) >= self.max_pending:
                raise ReportBusy("too many attestation reports are being collected; retry shortly")
            flight = _Flight(anyio.Event())
            self._flights[key] = flight
            try:
                chosen = nonce if nonce is not None else secrets.token_bytes(32)
                flight.result = await self._collect_in_thread(chosen, algo, tls_layout)
                if nonce is None:
                    self._cached[(algo, tls_layout)] = (self._clock(), flight.result)
            except Exception as exc:
                flight.error = exc
                raise
            finally:
                del self._flights[key]
                flight.done.set()
            return flight.result
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.result is not None
        return flight.result

    async def _collect_in_thread(
        self, nonce: bytes, algo: SigningAlgo, tls_layout: bool
    ) -> AttestationReport:
        async with self._limiter:
            if not self._threads.acquire(blocking=False):
                raise TrustRootError("earlier evidence collections are still hanging")

            def collect() -> AttestationReport:
                try:
                    return self.collect(nonce, algo, tls_layout)
                finally:
                    self._threads.release()

            try:
                with anyio.fail_after(self.collection_timeout_s):
                    return await anyio.to_thread.run_sync(collect, abandon_on_cancel=True)
            except TimeoutError:
                log.error(
                    "attestation evidence collection took longer than %.1f s", self.collection_timeout_s
                )
                raise TrustRootError(
                    f"evidence collection took longer than {self.collection_timeout_s:g} s"
                ) from None
            except (TeeInferenceError, ValueError):
                raise
            except Exception as exc:
                # A provider's own error type (an NVML or socket error): a 503, never a 500.
                log.error("attestation evidence collection failed: %s", type(exc).__name__)
                raise TrustRootError(f"evidence collection failed ({type(exc).__name__})") from None

    def collect(self, nonce: bytes, algo: SigningAlgo, tls_layout: bool = False) -> AttestationReport:
        """One report, collected synchronously (blocking calls to the providers)."""
        if len(nonce) != 32:
            raise ValueError("the nonce is 32 bytes")
        started = time.perf_counter()
        signer, tls = self.keys.signer, self.keys.tls
        if algo == "ecdsa":
            public_key = signer.ecdsa.public_key
            identity = bytes.fromhex(signer.ecdsa.address[2:])
        else:
            public_key = identity = signer.ed25519.public_key
        spki = tls.spki_sha256 if tls is not None else None
        if tls_layout and spki is not None:
            report_data = report_data_for_tls(identity, spki, nonce)
        else:
            report_data = report_data_for(algo, identity, nonce)
        quote = self.tdx.get_quote(report_data)
        events = self.tdx.event_log()
        gpu_payload = self.gpu.evidence(nonce)
        report = AttestationReport(
            signing_address=signer.ecdsa.address,
            signing_algo=algo,
            signing_public_key=public_key,
            request_nonce=nonce,
            intel_quote=quote.hex(),
            nvidia_payload=gpu_payload.to_json(),
            event_log=[event.to_dict() for event in events],
            info=self.info,
            tls_cert_fingerprint=spki.hex() if spki is not None else None,
        )
        log.info("attestation report collected in %.3f s", time.perf_counter() - started)
        return report


def parse_nonce(value: str | None) -> bytes | None:
    """A caller's nonce: exactly 64 hex characters (32 bytes). Raises ValueError otherwise."""
    if value is None:
        return None
    if _NONCE.fullmatch(value) is None:
        raise ValueError("nonce must be 64 hex characters (32 bytes)")
    return bytes.fromhex(value)
