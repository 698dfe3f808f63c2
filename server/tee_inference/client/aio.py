"""The asynchronous verifying client (``AsyncOpenAI(http_client=AsyncAttestedClient(…))``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx

from tee_inference.client.checks import Attestation, ResponseChecker, SignatureMismatchError
from tee_inference.client.session import (
    Settings,
    encrypted_answer,
    is_stale_key_refusal,
    may_be_stale_key_refusal,
    prepare_request,
    signature_record,
)
from tee_inference.verify.measurements import ExpectedMeasurements
from tee_inference.verify.tlspin import PinMismatchError
from tee_inference.verify.verifier import Verifier


class AsyncAttestedTransport(httpx.AsyncBaseTransport):
    """The asynchronous transport behind ``AsyncAttestedClient``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        pin = settings.pin
        self.inner = httpx.AsyncHTTPTransport(verify=pin.context if pin is not None else True)
        self.attestation: Attestation | None = None
        self._lock = anyio.Lock()

    async def attest(self) -> Attestation:
        """Attest now, with a fresh nonce; the result replaces the kept one."""
        return await self._replace(self.attestation, force=True)

    async def _replace(self, seen: Attestation | None, *, force: bool = False) -> Attestation:
        """Attest, unless another task replaced ``seen`` (the attestation the caller used) meanwhile.

        One runs at a time: concurrent first requests (or requests that all met a server's new
        key) wait for one attestation instead of each attesting and moving the shared pin.
        """
        async with self._lock:
            if not force and self.attestation is not None and self.attestation is not seen:
                return self.attestation
            request, nonce, probe = self.settings.report_request()
            verify = probe.context if probe is not None else True
            async with httpx.AsyncHTTPTransport(verify=verify) as transport:
                reply = await transport.handle_async_request(request)
                body = await reply.aread()
            collateral = await self.settings.collateral.for_report(body)
            self.attestation = self.settings.judge(reply.status_code, body, nonce, probe, collateral)
            return self.attestation

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attestation = self.attestation or await self._replace(None)
        sent, request_hash, exchange = prepare_request(request, attestation, self.settings.encrypt)
        try:
            response = await self.inner.handle_async_request(sent)
        except httpx.ConnectError as exc:
            if not isinstance(exc.__context__, PinMismatchError) and "attested" not in str(exc):
                raise
            attestation = await self._replace(attestation)
            sent, request_hash, exchange = prepare_request(request, attestation, self.settings.encrypt)
            response = await self.inner.handle_async_request(sent)
        else:
            if may_be_stale_key_refusal(response, exchange):
                body = await response.aread()
                await response.aclose()
                if not is_stale_key_refusal(response.status_code, body):
                    return httpx.Response(
                        response.status_code, headers=response.headers, content=body,
                        extensions=response.extensions, request=request,
                    )  # fmt: skip
                attestation = await self._replace(attestation)  # sealed to a key no longer served
                sent, request_hash, exchange = prepare_request(request, attestation, self.settings.encrypt)
                response = await self.inner.handle_async_request(sent)
        if request_hash is None or (response.status_code != 200 and not encrypted_answer(response, exchange)):
            return response
        checker = ResponseChecker(request_hash, response, attestation, exchange)
        return httpx.Response(
            response.status_code, headers=response.headers, extensions=response.extensions,
            stream=_AsyncCheckedStream(response, checker, self), request=request,
        )  # fmt: skip

    async def fetch_signature(self, completion_id: str) -> dict[str, Any]:
        reply = await self.inner.handle_async_request(self.settings.signature_request(completion_id))
        body = await reply.aread()
        await reply.aclose()
        return signature_record(completion_id, reply.status_code, body)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _AsyncCheckedStream(httpx.AsyncByteStream):
    def __init__(
        self, response: httpx.Response, checker: ResponseChecker, transport: AsyncAttestedTransport
    ) -> None:
        self.response, self.checker, self.transport = response, checker, transport

    async def __aiter__(self) -> AsyncIterator[bytes]:
        checker = self.checker
        async for chunk in self.response.aiter_raw():
            out = checker.feed(chunk)
            if checker.done and checker.streaming:
                await self._verify()
                yield out
                return
            if out:
                yield out
        rest = checker.finish()
        await self._verify()
        if rest:
            yield rest

    async def _verify(self) -> None:
        checker = self.checker
        fetched = None
        if checker.needs_fetch:
            completion_id = checker.completion_id
            if completion_id is None:
                raise SignatureMismatchError("the answer carries no completion id")
            fetched = await self.transport.fetch_signature(completion_id)
        checker.verify(fetched)

    async def aclose(self) -> None:
        await self.response.aclose()


class AsyncAttestedClient(httpx.AsyncClient):
    """``AttestedClient`` for asyncio (``AsyncOpenAI(http_client=…)``)."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        expect: ExpectedMeasurements | str | Path | None = None,
        allow_unmeasured: bool = False,
        allow_simulated: bool = False,
        allow_plaintext: bool = False,
        signing_algo: str = "ecdsa",
        api_key: str | None = None,
        verifier: Verifier | None = None,
        encrypt: bool = False,
        collateral: Any = None,
        pccs_url: str | None = None,
        allow_missing_collateral: bool = False,
        gateway: bool = False,
        **kwargs: Any,
    ) -> None:
        settings = Settings.for_client(
            base_url, model, expect, allow_unmeasured=allow_unmeasured, allow_simulated=allow_simulated,
            allow_plaintext=allow_plaintext, signing_algo=signing_algo, api_key=api_key, verifier=verifier,
            encrypt=encrypt, collateral=collateral, pccs_url=pccs_url,
            allow_missing_collateral=allow_missing_collateral, gateway=gateway,
        )  # fmt: skip
        self.attested_transport = AsyncAttestedTransport(settings)
        super().__init__(transport=self.attested_transport, **kwargs)

    async def attest(self) -> Attestation:
        """Attest now (it happens before the first request anyway); the result is kept."""
        return await self.attested_transport.attest()

    @property
    def attestation(self) -> Attestation | None:
        return self.attested_transport.attestation
