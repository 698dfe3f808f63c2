"""The synchronous verifying client (``OpenAI(http_client=AttestedClient(…))``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


class AttestedTransport(httpx.BaseTransport):
    """The synchronous transport behind ``AttestedClient``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        pin = settings.pin
        self.inner = httpx.HTTPTransport(verify=pin.context if pin is not None else True)
        self.attestation: Attestation | None = None
        self._lock = threading.Lock()

    def attest(self) -> Attestation:
        """Attest now, with a fresh nonce; the result replaces the kept one."""
        return self._replace(self.attestation, force=True)

    def _replace(self, seen: Attestation | None, *, force: bool = False) -> Attestation:
        """Attest, unless another thread replaced ``seen`` (the attestation the caller used) meanwhile.

        One runs at a time, so concurrent first requests wait for one attestation.
        """
        with self._lock:
            if not force and self.attestation is not None and self.attestation is not seen:
                return self.attestation
            request, nonce, probe = self.settings.report_request()
            with httpx.HTTPTransport(verify=probe.context if probe is not None else True) as transport:
                reply = transport.handle_request(request)
                body = reply.read()
            collateral = self.settings.collateral.for_report_sync(body)
            self.attestation = self.settings.judge(reply.status_code, body, nonce, probe, collateral)
            return self.attestation

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attestation = self.attestation or self._replace(None)
        sent, request_hash, exchange = prepare_request(request, attestation, self.settings.encrypt)
        try:
            response = self.inner.handle_request(sent)
        except httpx.ConnectError as exc:
            if not isinstance(exc.__context__, PinMismatchError) and "attested" not in str(exc):
                raise
            attestation = self._replace(attestation)  # the key changed (a reboot): attest again, once
            sent, request_hash, exchange = prepare_request(request, attestation, self.settings.encrypt)
            response = self.inner.handle_request(sent)
        else:
            if may_be_stale_key_refusal(response, exchange):
                body = response.read()
                response.close()
                if not is_stale_key_refusal(response.status_code, body):
                    return httpx.Response(
                        response.status_code, headers=response.headers, content=body,
                        extensions=response.extensions, request=request,
                    )  # fmt: skip
                attestation = self._replace(attestation)  # sealed to a key no longer served: once
                sent, request_hash, exchange = prepare_request(request, attestation, self.settings.encrypt)
                response = self.inner.handle_request(sent)
        if request_hash is None or (response.status_code != 200 and not encrypted_answer(response, exchange)):
            return response
        checker = ResponseChecker(request_hash, response, attestation, exchange)
        return httpx.Response(
            response.status_code, headers=response.headers, extensions=response.extensions,
            stream=_CheckedStream(response, checker, self), request=request,
        )  # fmt: skip

    def fetch_signature(self, completion_id: str) -> dict[str, Any]:
        reply = self.inner.handle_request(self.settings.signature_request(completion_id))
        body = reply.read()
        reply.close()
        return signature_record(completion_id, reply.status_code, body)

    def close(self) -> None:
        self.inner.close()


class _CheckedStream(httpx.SyncByteStream):
    def __init__(
        self, response: httpx.Response, checker: ResponseChecker, transport: AttestedTransport
    ) -> None:
        self.response, self.checker, self.transport = response, checker, transport

    def __iter__(self) -> Iterator[bytes]:
        checker = self.checker
        for chunk in self.response.iter_raw():
            out = checker.feed(chunk)
            if checker.done and checker.streaming:
                self._verify()
                yield out
                return  # [DONE] is the last event; the SDK stops reading here anyway
            if out:
                yield out
        rest = checker.finish()
        self._verify()
        if rest:
            yield rest

    def _verify(self) -> None:
        checker = self.checker
        fetched = None
        if checker.needs_fetch:
            completion_id = checker.completion_id
            if completion_id is None:
                raise SignatureMismatchError("the answer carries no completion id")
            fetched = self.transport.fetch_signature(completion_id)
        checker.verify(fetched)

    def close(self) -> None:
        self.response.close()


class AttestedClient(httpx.Client):
    """An ``httpx.Client`` that only talks to an attested server and checks every completion.

    ``expect`` is an expected-measurements file (or object); without one, measurements are not
    compared and ``allow_unmeasured=True`` must say that this is knowingly accepted.
    """

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
        self.attested_transport = AttestedTransport(settings)
        super().__init__(transport=self.attested_transport, **kwargs)

    def attest(self) -> Attestation:
        """Attest now (it happens before the first request anyway); the result is kept."""
        return self.attested_transport.attest()

    @property
    def attestation(self) -> Attestation | None:
        return self.attested_transport.attestation
