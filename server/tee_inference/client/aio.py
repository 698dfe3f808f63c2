"""The asynchronous verifying client (``AsyncOpenAI(http_client=AsyncAttestedClient(…))``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from tee_inference.client.checks import Attestation, ResponseChecker, SignatureMismatchError
from tee_inference.client.session import Settings, encrypted_answer, prepare_request, signature_record
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

    async def attest(self) -> Attestation:
        request, nonce, probe = self.settings.report_request()
        async with httpx.AsyncHTTPTransport(verify=probe.context if probe is not None else True) as transport:
            reply = await transport.handle_async_request(request)
            body = await reply.aread()
        self.attestation = self.settings.judge(reply.status_code, body, nonce, probe)
        return self.attestation

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attestation = self.attestation or await self.attest()
        sent, request_hash, exchange = prepare_request(request, attestation, self.settings.encrypt)
        try:
            response = await self.inner.handle_async_request(sent)
        except httpx.ConnectError as exc:
            if not isinstance(exc.__context__, PinMismatchError) and "attested" not in str(exc):
                raise
            attestation = await self.attest()
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
                raise SignatureMismatchError("the stream carries no completion id")
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
        **kwargs: Any,
    ) -> None:
        settings = Settings.for_client(
            base_url, model, expect, allow_unmeasured=allow_unmeasured, allow_simulated=allow_simulated,
            allow_plaintext=allow_plaintext, signing_algo=signing_algo, api_key=api_key, verifier=verifier,
            encrypt=encrypt,
        )  # fmt: skip
        self.attested_transport = AsyncAttestedTransport(settings)
        super().__init__(transport=self.attested_transport, **kwargs)

    async def attest(self) -> Attestation:
        return await self.attested_transport.attest()
