"""A verifying HTTP client: attested once, pinned to the attested TLS key, every answer's signature checked.

The OpenAI Python SDK accepts it unchanged as ``http_client=``::

    from openai import OpenAI
    from tee_inference.client import AttestedClient

    http = AttestedClient("https://llm.example:8000", model="SmolLM2-135M-Instruct",
                          expect="measurements/expected.json")
    llm = OpenAI(base_url="https://llm.example:8000/v1", api_key="…", http_client=http)
    print(llm.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[…]))

Before the first request it attests the server with a fresh nonce (quote, GPU evidence, expected
measurements, the TLS key bound into report_data) and pins every connection to the attested SPKI,
checked during the TLS handshake, so nothing is sent to a peer that is not the attested server.
Each completion's signature is checked over the exact bytes sent and received: from the
``X-Signature*`` headers for whole answers, and for streams when ``data: [DONE]`` arrives — in-band
when the server sends it (``X-Signature-Inband``), else fetched by completion id — before the SDK
sees the last event. Any mismatch raises ``SignatureMismatchError``; a server that does not verify,
``AttestationError``. When a handshake fails because the server came back with a new key (a
reboot), it attests again once and retries: the request had not been sent.

With ``encrypt=True`` completion bodies are also end-to-end encrypted (EHBP, ``e2ee.py``) to the
X25519 key the boot's keyset event attests, for deployments where a gateway or load balancer
outside the CVM routes the request: the body it sees is ciphertext, the model name travels in the
``X-Tee-Model`` header, and the signature covers the ciphertext both ways (the exact bytes
exchanged), so a third party can check it without reading the prompt.

Through a gateway (docs/gateway.md) the report lists every node it routes to; a response is
checked under the key of the node that signed it, which must be one of the verified ones, and with
``encrypt=True`` each body is sealed to one node (named in ``X-Tee-Node`` for the gateway to route).
``gateway=True`` says the TLS connection ends at the gateway, outside the CVMs: it is checked as any
https site's, not pinned, and ``encrypt=True`` is then required.

``AsyncAttestedClient`` is the same for ``AsyncOpenAI``. The checks on the response bytes are
shared (``ResponseChecker``); only the I/O differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import httpx

from tee_inference.e2ee import ENC_HEADER, NONCE_HEADER, ClientExchange
from tee_inference.exceptions import TeeInferenceError
from tee_inference.sse import StreamIdScanner
from tee_inference.verify.measurements import ExpectedMeasurements, load_expected_measurements
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.results import VerificationResult
from tee_inference.verify.signature import verify_signature
from tee_inference.verify.tlspin import PinMismatchError, SpkiPin
from tee_inference.verify.verifier import Verifier

COMPLETION_PATHS: Final = frozenset({"/v1/chat/completions", "/v1/completions"})
INBAND_HEADER: Final = "x-signature-inband"
_INBAND_PREFIX: Final = b": signature "
_DONE: Final = b"data: [DONE]\n\n"


class AttestationError(TeeInferenceError):
    """The server did not verify: ``result`` holds every check."""

    def __init__(self, result: VerificationResult) -> None:
        blocking = ", ".join(f"{c.name}: {c.detail}" for c in result.blocking[:3])
        super().__init__(f"the server did not verify ({blocking})")
        self.result = result


class SignatureMismatchError(TeeInferenceError):
    """A response's signature is missing, or does not cover the bytes this client exchanged."""


@dataclass(frozen=True)
class AttestedNode:
    """One verified node of a report (a gateway's lists several): its key and its body-encryption key."""

    identity: str  # the ecdsa address, or the ed25519 public key (hex)
    address: str | None
    e2ee_public_key: bytes | None


@dataclass(frozen=True)
class Attestation:
    """What one verification established: the keys a response may be checked against."""

    result: VerificationResult
    signing_algo: str
    identity: str  # the ecdsa address, or the ed25519 public key (hex)
    tls_spki_sha256: bytes | None
    e2ee_public_key: bytes | None = None
    nodes: tuple[AttestedNode, ...] = ()  # every verified node, this one first

    def identity_for(self, named: object) -> str:
        """The verified key a response names (a gateway's come from several nodes), else this node's."""
        if isinstance(named, str):
            for node in self.nodes:
                if node.identity.lower() == named.lower():
                    return node.identity
        return self.identity


def _policy(expect: ExpectedMeasurements | str | Path | None, allow_simulated: bool) -> VerificationPolicy:
    expected = []
    if expect is not None:
        expected = [
            expect if isinstance(expect, ExpectedMeasurements) else load_expected_measurements(expect)
        ]
    return VerificationPolicy.build(
        expected=expected, allow_simulated=allow_simulated, relax=() if expected else ("measurements",)
    )


class ResponseChecker:
    """The signature checks over one completion's bytes, without I/O (sync and async share it).

    ``feed`` every chunk as it arrives and forward what it returns (an in-band signature comment
    is taken out, exactly as the server left it out of the signed hash). When ``done`` is true
    the signature must be checked before the last bytes are handed on: ``needs_fetch`` says
    whether it has to be fetched by ``completion_id``; ``verify`` raises on any mismatch.
    """

    def __init__(
        self,
        request_hash: str,
        response: httpx.Response,
        attestation: Attestation,
        exchange: ClientExchange | None = None,
    ) -> None:
        self.request_hash = request_hash
        self.attestation = attestation
        self.headers = response.headers
        self.exchange = exchange
        # Error answers are never signed; to an encrypted request they are still encrypted.
        self.signed = response.status_code == 200
        if exchange is not None:
            exchange.start_response(response.headers.get(NONCE_HEADER.decode()))
        self.streaming = response.headers.get("content-type", "").startswith("text/event-stream")
        self.hash = hashlib.sha256()
        self.scanner = StreamIdScanner()
        self.whole = bytearray()
        self.partial = b""
        self.tail = b""
        self.inband: dict[str, Any] | None = None
        self.skip_blank = False
        self.done = False

    @property
    def completion_id(self) -> str | None:
        if self.streaming:
            return self.scanner.completion_id
        try:
            value = json.loads(bytes(self.whole)).get("id")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    @property
    def needs_fetch(self) -> bool:
        if not self.signed:
            return False
        # Encrypted streams carry no in-band signature: it would have to cover itself.
        return self.streaming and self.inband is None

    def feed(self, chunk: bytes) -> bytes:
        if self.exchange is not None:
            # The wire bytes are signed; the plaintext is what the caller reads and what is scanned.
            self.hash.update(chunk)
            return self._plain(self.exchange.open(chunk))
        if not self.streaming:
            self.hash.update(chunk)
            self.whole += chunk
            return chunk
        out = bytearray()
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()  # an unterminated line waits for its end
        for line in lines:
            raw = line + b"\n"
            if self.skip_blank:
                # The in-band comment is its own SSE block: its closing blank line is not the engine's.
                self.skip_blank = False
                if not line:
                    continue
            if line.startswith(_INBAND_PREFIX) and self.inband is None:
                self.inband = self._parse_inband(line[len(_INBAND_PREFIX) :])
                self.skip_blank = True
                continue
            self.hash.update(raw)
            self.scanner.feed(raw)
            out += raw
            self.tail = (self.tail + raw)[-len(_DONE) :]
            if self.tail == _DONE:
                self.done = True
        return bytes(out)

    def _plain(self, plaintext: bytes) -> bytes:
        if not self.streaming:
            self.whole += plaintext
            return plaintext
        self.scanner.feed(plaintext)
        self.tail = (self.tail + plaintext)[-len(_DONE) :]
        if self.tail == _DONE:
            self.done = True
        return plaintext

    def finish(self) -> bytes:
        """At the end of the body: what is left, and whether the stream ended without [DONE]."""
        if self.exchange is not None:
            self.exchange.finish()
        rest, self.partial = self.partial, b""
        if rest:
            self.hash.update(rest)
        if not self.streaming:
            self.done = True
        elif not self.done:
            raise SignatureMismatchError("the stream ended before data: [DONE]: it was cut short")
        return rest

    @staticmethod
    def _parse_inband(text: bytes) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError:
            raise SignatureMismatchError("the in-band signature is not JSON") from None
        if not isinstance(value, dict):
            raise SignatureMismatchError("the in-band signature is not a JSON object")
        return value

    def verify(self, fetched: Mapping[str, Any] | None = None) -> None:
        """Check the signature (headers, in-band or ``fetched``) over this exchange's bytes."""
        if not self.signed:
            return
        text = f"{self.request_hash}:{self.hash.hexdigest()}"
        algo = self.attestation.signing_algo
        record: Mapping[str, Any] | None = fetched or self.inband
        if record is None:
            record = self._from_headers()
        identity = self.attestation.identity_for(self._named(record, algo))
        if record.get("text") != text:
            raise SignatureMismatchError(
                f"the server signed {record.get('text')!r}, but the bytes exchanged hash to {text!r}"
            )
        signature = self._signature(record, algo)
        check = (
            verify_signature(text, signature, address=identity)
            if algo == "ecdsa"
            else verify_signature(text, signature, public_key=identity)
        )
        if check.status.value != "pass":
            raise SignatureMismatchError(check.detail)

    def _named(self, record: Mapping[str, Any], algo: str) -> object:
        """The key the answer says signed it (checked only against verified nodes' keys)."""
        if algo == "ecdsa":
            return record.get("signing_address") or self.headers.get("x-signing-address")
        return (
            record.get("signing_public_key")
            or record.get("signing_public_key_ed25519")
            or self.headers.get("x-signing-public-key-ed25519")
        )

    def _from_headers(self) -> dict[str, str]:
        h = self.headers
        if "x-signature-text" not in h:
            raise SignatureMismatchError("the answer carries no X-Signature-Text header")
        return {
            "text": h["x-signature-text"],
            "signature": h.get("x-signature", ""),
            "ed25519": h.get("x-signature-ed25519", ""),
        }

    @staticmethod
    def _signature(record: Mapping[str, Any], algo: str) -> str:
        if algo == "ed25519":
            value = (
                record.get("ed25519")
                or record.get("signature_ed25519")
                or (record.get("signature") if record.get("signing_algo") == "ed25519" else None)
            )
        else:
            value = record.get("signature") if record.get("signing_algo", "ecdsa") == "ecdsa" else None
            value = value or record.get("ecdsa")
        if not isinstance(value, str) or not value:
            raise SignatureMismatchError(f"no {algo} signature for this completion")
        return value


class _Settings:
    def __init__(
        self,
        base_url: str,
        model: str,
        expect: ExpectedMeasurements | str | Path | None,
        *,
        allow_simulated: bool,
        allow_plaintext: bool,
        signing_algo: str,
        api_key: str | None,
        verifier: Verifier | None,
        encrypt: bool = False,
        gateway: bool = False,
    ) -> None:
        self.encrypt = encrypt
        self.base_url = base_url.rstrip("/")
        self.secure = self.base_url.lower().startswith("https://")
        if gateway and not encrypt:
            raise TeeInferenceError(
                "through a gateway the TLS connection ends outside the CVMs: use encrypt=True, so that "
                "bodies are end-to-end encrypted to the node that serves them"
            )
        if not self.secure and not allow_plaintext:
            raise TeeInferenceError(
                f"refusing {base_url}: use https (allow_plaintext=True for loopback development)"
            )
        self.model, self.signing_algo = model, signing_algo
        self.policy = _policy(expect, allow_simulated)
        if not self.secure:
            self.policy = replace(self.policy, relax=self.policy.relax | {"tls_binding"})
        self.verifier = verifier or Verifier.production()
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # A gateway's TLS is its own (checked against the system's CAs); a node's is pinned.
        self.pin = SpkiPin() if self.secure and not gateway else None

    def report_request(self) -> tuple[httpx.Request, bytes, SpkiPin | None]:
        """A fresh-nonce report request, and the probe pin its own connection records the key with.

        The report travels on a connection of its own, never pinned in advance: it says which key
        to pin. Only after it verifies is the shared pin moved, so no request of the client ever
        goes out on a connection that was not checked against an attested key.
        """
        nonce = os.urandom(32)
        params = {"model": self.model, "nonce": nonce.hex(), "signing_algo": self.signing_algo}
        if self.pin is not None:
            params["include_tls_fingerprint"] = "true"
        request = httpx.Request(
            "GET", f"{self.base_url}/v1/attestation/report", params=params, headers=self.headers
        )
        return request, nonce, SpkiPin() if self.pin is not None else None

    def signature_request(self, completion_id: str) -> httpx.Request:
        params = {"model": self.model, "signing_algo": self.signing_algo}
        return httpx.Request(
            "GET", f"{self.base_url}/v1/signature/{completion_id}", params=params, headers=self.headers
        )

    def judge(self, status: int, body: bytes, nonce: bytes, probe: SpkiPin | None) -> Attestation:
        if status != 200:
            raise TeeInferenceError(f"the server answered the attestation request with HTTP {status}")
        result = self.verifier.verify_report(
            body, self.policy, nonce=nonce, model=self.model, signing_algo=self.signing_algo,
            tls_layout=True if self.pin is not None else None,
        )  # fmt: skip
        if not result.ok:
            raise AttestationError(result)
        spki = None
        if self.pin is not None and probe is not None:
            attested = result.attested.get("tls_cert_fingerprint")
            live = probe.last_seen
            if not isinstance(attested, str) or live is None or live.hex() != attested:
                raise TeeInferenceError(
                    f"the TLS connection presented SPKI {live.hex() if live else None}, the attested key is "
                    f"{attested}: a TLS-terminating relay or an unattested server answered"
                )
            spki = live
            self.pin.pin(live)
        field = "signing_address" if self.signing_algo == "ecdsa" else "signing_public_key"
        e2ee = result.attested.get("e2ee_public_key")
        if self.encrypt and not isinstance(e2ee, str):
            raise TeeInferenceError("the server attests no key for encrypted bodies")
        nodes = [AttestedNode(str(result.attested[field]), result.attested.get("signing_address"),
                              bytes.fromhex(e2ee) if e2ee else None)]  # fmt: skip
        for node in result.attested.get("nodes", [])[1:]:
            if node.get("ok") and isinstance(node.get(field), str):
                key = node.get("e2ee_public_key")
                nodes.append(AttestedNode(node[field], node.get("signing_address"),
                                          bytes.fromhex(key) if isinstance(key, str) else None))  # fmt: skip
        return Attestation(
            result,
            self.signing_algo,
            str(result.attested[field]),
            spki,
            bytes.fromhex(e2ee) if e2ee else None,
            tuple(nodes),
        )


def _signature_record(completion_id: str, status: int, body: bytes) -> dict[str, Any]:
    if status != 200:
        raise SignatureMismatchError(f"no signature for {completion_id}: HTTP {status}")
    try:
        value = json.loads(body)
    except ValueError:
        raise SignatureMismatchError(f"the signature of {completion_id} is not JSON") from None
    if not isinstance(value, dict):
        raise SignatureMismatchError(f"the signature of {completion_id} is not a JSON object")
    return value


def _encrypted_answer(response: httpx.Response, exchange: ClientExchange | None) -> bool:
    """An answer to decrypt: to an encrypted request, it carries the response nonce.

    A non-2xx answer without it passes through as untrusted plaintext (EHBP §5.3: an intermediary
    or the server before decryption answered); a 2xx answer without it fails when it is read.
    """
    return exchange is not None and (response.status_code == 200 or NONCE_HEADER.decode() in response.headers)


def _prepare(
    request: httpx.Request, attestation: Attestation, encrypt: bool
) -> tuple[httpx.Request, str | None, ClientExchange | None]:
    """For a completion: identity encoding, the body sealed when asked, and the hash of the wire body."""
    if request.method != "POST" or request.url.path.rstrip("/") not in COMPLETION_PATHS:
        return request, None, None
    headers = httpx.Headers(request.headers)
    headers["accept-encoding"] = "identity"
    body = request.read()
    exchange = None
    if encrypt:
        # Several nodes (a gateway): seal to one of them and name it, so the gateway routes there.
        sealable = [n for n in attestation.nodes if n.e2ee_public_key is not None]
        if not sealable:
            raise AttestationError(attestation.result)
        target = secrets.choice(sealable)
        assert target.e2ee_public_key is not None
        exchange = ClientExchange(target.e2ee_public_key)
        if len(attestation.nodes) > 1 and target.address:
            headers["x-tee-node"] = target.address
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            model = None
        if isinstance(model, str):
            headers["x-tee-model"] = model  # the one field a gateway may read to route
        headers[ENC_HEADER.decode()] = exchange.enc_header.decode()
        body = exchange.seal_body(body)
    else:
        headers[INBAND_HEADER] = "1"
    headers.pop("content-length", None)
    sent = httpx.Request(
        request.method, request.url, headers=headers, content=body, extensions=request.extensions
    )
    return sent, hashlib.sha256(body).hexdigest(), exchange


class AttestedTransport(httpx.BaseTransport):
    """The synchronous transport behind ``AttestedClient``."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        pin = settings.pin
        self.inner = httpx.HTTPTransport(verify=pin.context if pin is not None else True)
        self.attestation: Attestation | None = None
        self._lock = threading.Lock()

    def attest(self) -> Attestation:
        with self._lock:
            request, nonce, probe = self.settings.report_request()
            with httpx.HTTPTransport(verify=probe.context if probe is not None else True) as transport:
                reply = transport.handle_request(request)
                body = reply.read()
            self.attestation = self.settings.judge(reply.status_code, body, nonce, probe)
            return self.attestation

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attestation = self.attestation or self.attest()
        sent, request_hash, exchange = _prepare(request, attestation, self.settings.encrypt)
        try:
            response = self.inner.handle_request(sent)
        except httpx.ConnectError as exc:
            if not isinstance(exc.__context__, PinMismatchError) and "attested" not in str(exc):
                raise
            attestation = self.attest()  # the server's key changed (a reboot): attest again, once
            sent, request_hash, exchange = _prepare(request, attestation, self.settings.encrypt)
            response = self.inner.handle_request(sent)
        if request_hash is None or (
            response.status_code != 200 and not _encrypted_answer(response, exchange)
        ):
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
        return _signature_record(completion_id, reply.status_code, body)

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
                raise SignatureMismatchError("the stream carries no completion id")
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
        gateway: bool = False,
        **kwargs: Any,
    ) -> None:
        if expect is None and not allow_unmeasured:
            raise TeeInferenceError("give expect= (an expected-measurements file) or allow_unmeasured=True")
        settings = _Settings(
            base_url, model, expect, allow_simulated=allow_simulated, allow_plaintext=allow_plaintext,
            signing_algo=signing_algo, api_key=api_key, verifier=verifier, encrypt=encrypt, gateway=gateway,
        )  # fmt: skip
        self.attested_transport = AttestedTransport(settings)
        super().__init__(transport=self.attested_transport, **kwargs)

    def attest(self) -> Attestation:
        """Attest now (it happens before the first request anyway); the result is kept."""
        return self.attested_transport.attest()

    @property
    def attestation(self) -> Attestation | None:
        return self.attested_transport.attestation


class AsyncAttestedTransport(httpx.AsyncBaseTransport):
    """The asynchronous transport behind ``AsyncAttestedClient``."""

    def __init__(self, settings: _Settings) -> None:
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
        sent, request_hash, exchange = _prepare(request, attestation, self.settings.encrypt)
        try:
            response = await self.inner.handle_async_request(sent)
        except httpx.ConnectError as exc:
            if not isinstance(exc.__context__, PinMismatchError) and "attested" not in str(exc):
                raise
            attestation = await self.attest()
            sent, request_hash, exchange = _prepare(request, attestation, self.settings.encrypt)
            response = await self.inner.handle_async_request(sent)
        if request_hash is None or (
            response.status_code != 200 and not _encrypted_answer(response, exchange)
        ):
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
        return _signature_record(completion_id, reply.status_code, body)

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
        gateway: bool = False,
        **kwargs: Any,
    ) -> None:
        if expect is None and not allow_unmeasured:
            raise TeeInferenceError("give expect= (an expected-measurements file) or allow_unmeasured=True")
        settings = _Settings(
            base_url, model, expect, allow_simulated=allow_simulated, allow_plaintext=allow_plaintext,
            signing_algo=signing_algo, api_key=api_key, verifier=verifier, encrypt=encrypt, gateway=gateway,
        )  # fmt: skip
        self.attested_transport = AsyncAttestedTransport(settings)
        super().__init__(transport=self.attested_transport, **kwargs)

    async def attest(self) -> Attestation:
        return await self.attested_transport.attest()
