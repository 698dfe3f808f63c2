"""Attesting a server and preparing requests: the client's settings and its request-side steps."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import httpx

from tee_inference.attestation.report import AttestationReport
from tee_inference.client.checks import (
    COMPLETION_PATHS,
    INBAND_HEADER,
    Attestation,
    AttestationError,
    AttestedNode,
    SignatureMismatchError,
)
from tee_inference.e2ee import ENC_HEADER, NONCE_HEADER, ClientExchange
from tee_inference.exceptions import TeeInferenceError
from tee_inference.verify.collateral import fetch_collaterals, load_collateral, report_quotes
from tee_inference.verify.measurements import ExpectedMeasurements, load_expected_measurements
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.tlspin import SpkiPin
from tee_inference.verify.verifier import Verifier


def verification_policy(
    expect: ExpectedMeasurements | str | Path | None,
    allow_simulated: bool,
    allow_missing_collateral: bool = False,
) -> VerificationPolicy:
    expected = []
    if expect is not None:
        expected = [
            expect if isinstance(expect, ExpectedMeasurements) else load_expected_measurements(expect)
        ]
    relax = [] if expected else ["measurements"]
    if allow_missing_collateral:
        relax.append("tcb_status")
    return VerificationPolicy.build(expected=expected, allow_simulated=allow_simulated, relax=relax)


class Collateral:
    """Where the Intel collateral for the server's quotes comes from (tcb_status needs it).

    A fixed ``collateral`` (a QuoteCollateralV3 object or JSON file, or a list of them, one per
    platform) serves an offline or pinned audit; ``pccs_url`` fetches it for each attestation, one
    per platform among the report's nodes (a gateway's nodes may run on different CPUs).
    """

    def __init__(self, collateral: Any, pccs_url: str | None) -> None:
        if collateral is not None and pccs_url is not None:
            raise TeeInferenceError("give collateral= or pccs_url=, not both")
        if isinstance(collateral, list | tuple):
            collateral = [load_collateral(c) if isinstance(c, str | Path) else c for c in collateral]
        elif isinstance(collateral, str | Path):
            collateral = load_collateral(collateral)
        self.fixed, self.pccs_url = collateral, pccs_url

    def for_report_sync(self, body: bytes) -> Any:
        if self.fixed is not None or self.pccs_url is None:
            return self.fixed  # no event loop needed, so a sync client inside async code still works
        return asyncio.run(self.for_report(body))

    async def for_report(self, body: bytes) -> Any:
        """The collateral for the quotes in this report body (None when it cannot be had)."""
        if self.fixed is not None or self.pccs_url is None:
            return self.fixed
        quotes = _node_quotes(body)
        if not quotes:
            return None  # the report does not parse: the verifier says so, with or without collateral
        return await fetch_collaterals(self.pccs_url, quotes)


def _node_quotes(body: bytes) -> list[bytes]:
    """The raw quote of every node in a report body: the answering one's, then all_attestations'."""
    try:
        report, _ = AttestationReport.parse(json.loads(body))
    except (TeeInferenceError, ValueError):
        return []
    return report_quotes(report) if report is not None else []


class Settings:
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
        collateral: Any = None,
        pccs_url: str | None = None,
        allow_missing_collateral: bool = False,
        gateway: bool = False,
    ) -> None:
        self.encrypt = encrypt
        self.collateral = Collateral(collateral, pccs_url)
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
        self.policy = verification_policy(expect, allow_simulated, allow_missing_collateral)
        if not self.secure:
            self.policy = replace(self.policy, relax=self.policy.relax | {"tls_binding"})
        self.verifier = verifier or Verifier.production()
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # A gateway's TLS is its own (checked against the system's CAs); a node's is pinned.
        self.pin = SpkiPin() if self.secure and not gateway else None

    @classmethod
    def for_client(
        cls,
        base_url: str,
        model: str,
        expect: ExpectedMeasurements | str | Path | None,
        *,
        allow_unmeasured: bool,
        allow_simulated: bool,
        allow_plaintext: bool,
        signing_algo: str,
        api_key: str | None,
        verifier: Verifier | None,
        encrypt: bool,
        collateral: Any = None,
        pccs_url: str | None = None,
        allow_missing_collateral: bool = False,
        gateway: bool = False,
    ) -> Settings:
        """A client's settings; without an expected file, only when unmeasured is accepted by name."""
        if expect is None and not allow_unmeasured:
            raise TeeInferenceError("give expect= (an expected-measurements file) or allow_unmeasured=True")
        return cls(
            base_url, model, expect, allow_simulated=allow_simulated, allow_plaintext=allow_plaintext,
            signing_algo=signing_algo, api_key=api_key, verifier=verifier, encrypt=encrypt,
            collateral=collateral, pccs_url=pccs_url, allow_missing_collateral=allow_missing_collateral,
            gateway=gateway,
        )  # fmt: skip

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

    def judge(
        self, status: int, body: bytes, nonce: bytes, probe: SpkiPin | None, collateral: Any = None
    ) -> Attestation:
        if status != 200:
            raise TeeInferenceError(f"the server answered the attestation request with HTTP {status}")
        result = self.verifier.verify_report(
            body, self.policy, nonce=nonce, model=self.model, signing_algo=self.signing_algo,
            tls_layout=True if self.pin is not None else None, collateral=collateral,
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


def signature_record(completion_id: str, status: int, body: bytes) -> dict[str, Any]:
    if status != 200:
        raise SignatureMismatchError(f"no signature for {completion_id}: HTTP {status}")
    try:
        value = json.loads(body)
    except ValueError:
        raise SignatureMismatchError(f"the signature of {completion_id} is not JSON") from None
    if not isinstance(value, dict):
        raise SignatureMismatchError(f"the signature of {completion_id} is not a JSON object")
    return value


# Refusals of an encrypted request that mean no engine saw it: the key it was sealed to is no
# longer served (the node left the gateway's verified set, or restarted with a new body key).
# Attesting again and resealing once is then safe, and is how the client learns of the change.
_STALE_KEY_REFUSALS: Final = {(400, "node_not_verified"), (422, "e2ee_key_mismatch")}


def may_be_stale_key_refusal(response: httpx.Response, exchange: ClientExchange | None) -> bool:
    """Worth reading the error body: an encrypted request refused before it was opened.

    Reading it whole costs nothing new: the OpenAI SDK reads every error body in full anyway.
    """
    return (
        exchange is not None
        and response.status_code in (400, 422)
        and NONCE_HEADER.decode() not in response.headers
    )


def is_stale_key_refusal(status: int, body: bytes) -> bool:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return False
    return isinstance(code, str) and (status, code) in _STALE_KEY_REFUSALS


def encrypted_answer(response: httpx.Response, exchange: ClientExchange | None) -> bool:
    """An answer to decrypt: to an encrypted request, it carries the response nonce.

    A non-2xx answer without it passes through as untrusted plaintext (EHBP §5.3: an intermediary
    or the server before decryption answered); a 2xx answer without it fails when it is read.
    """
    return exchange is not None and (response.status_code == 200 or NONCE_HEADER.decode() in response.headers)


def prepare_request(
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
