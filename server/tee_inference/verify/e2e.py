"""End to end against a live server: a fresh nonce, a verified report, a signed completion.

Over https the connection itself is verified: the report is asked with the TLS key bound into
report_data (``include_tls_fingerprint=true``), the SPKI the live connection presented must be
the attested one (``tls_binding``), and from then on every connection is pinned to it, so the
completion travels over the attested channel too. Plain http is refused unless the caller accepts
it by name (``--allow-plaintext``, for loopback development).

The request body is serialized here and sent as raw bytes, and the response is read as raw bytes
before any JSON parsing: the hashes must be of exactly what crossed the wire (SPEC §2), so this
module never lets an HTTP library re-encode either side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final

import httpx

from tee_inference.signing import sha256_hex
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.results import CheckResult, Status, VerificationResult
from tee_inference.verify.signature import SIGNATURE, verify_signature
from tee_inference.verify.tlspin import SpkiPin
from tee_inference.verify.verifier import Verifier

REPORT_FETCH, COMPLETION, SIGNATURE_TEXT = "report_fetch", "completion", "signature_text"
TLS_BINDING: Final = "tls_binding"
DEFAULT_PROMPT: Final = "Reply with one word: hello."


def _get_json(client: httpx.Client, path: str, params: dict[str, str]) -> tuple[Any, str | None]:
    try:
        response = client.get(path, params=params)
    except httpx.HTTPError as exc:
        return None, f"GET {path}: {type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return None, f"GET {path}: HTTP {response.status_code}: {response.text[:200]}"
    try:
        return response.json(), None
    except ValueError:
        return None, f"GET {path}: answer is not JSON"


def _completion(
    client: httpx.Client, model: str, prompt: str, algo: str, identities: Sequence[str]
) -> list[CheckResult]:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 16,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    try:
        # identity: a compressed body would be decoded by httpx and the bytes hashed would not be the wire's.
        response = client.post(
            "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json", "accept-encoding": "identity"},
        )
    except httpx.HTTPError as exc:
        return [CheckResult.failed(COMPLETION, f"POST /v1/chat/completions: {type(exc).__name__}: {exc}")]
    raw = response.content
    try:
        completion_id = json.loads(raw)["id"]
    except (ValueError, KeyError, TypeError):
        completion_id = None
    if response.status_code != 200 or not isinstance(completion_id, str):
        return [
            CheckResult.failed(COMPLETION, f"HTTP {response.status_code}, no completion id: {raw[:200]!r}")
        ]
    out = [
        CheckResult.passed(COMPLETION, f"{completion_id}: {len(body)}-byte request, {len(raw)}-byte response")
    ]
    stored, error = _get_json(
        client, f"/v1/signature/{completion_id}", {"model": model, "signing_algo": algo}
    )
    if error or not isinstance(stored, dict):
        return [*out, CheckResult.failed(SIGNATURE, error or "signature answer is not an object")]
    text = f"{sha256_hex(body)}:{sha256_hex(raw)}"
    if stored.get("text") != text:
        out.append(CheckResult.failed(
            SIGNATURE_TEXT, f"server signed {stored.get('text')!r}, the bytes exchanged hash to {text!r}"
        ))  # fmt: skip
    else:
        out.append(CheckResult.passed(SIGNATURE_TEXT, f"sha256(request):sha256(response) = {text}"))
    signature = str(stored.get("signature", ""))
    # Through a gateway any verified node may have served it: the record names which; that one
    # must be among the nodes this report verified (a single node: the only one).
    named = stored.get("signing_address" if algo == "ecdsa" else "signing_public_key")
    identity = next(
        (i for i in identities if isinstance(named, str) and i.lower() == named.lower()), identities[0]
    )
    if algo == "ecdsa":
        out.append(verify_signature(text, signature, address=identity))
    else:
        out.append(verify_signature(text, signature, public_key=identity))
    return out


def attested_identities(attested: Mapping[str, Any], algo: str) -> list[str]:
    """The keys a signature may be checked against: the answering node's, then every other node of
    all_attestations that verified (a gateway's report lists each node it routes to)."""
    field = "signing_address" if algo == "ecdsa" else "signing_public_key"
    first = attested.get(field) if attested.get("signing_algo") == algo else None
    out = [first] if isinstance(first, str) else []
    for node in attested.get("nodes", [])[1:]:
        value = node.get(field)
        if node.get("ok") and isinstance(value, str) and value not in out:
            out.append(value)
    return out


def _tls_binding(secure: bool, pin: SpkiPin | None, attested: object) -> CheckResult:
    """tls_binding: the SPKI this connection presented is the one report_data and RTMR3 bind."""
    if not secure:
        return CheckResult.skipped(
            TLS_BINDING,
            "plain http, accepted by --allow-plaintext: nothing ties this connection to the server",
        )
    live = pin.last_seen if pin is not None else None
    if live is None:
        return CheckResult.failed(TLS_BINDING, "no TLS peer key was observed on this connection")
    if not isinstance(attested, str):
        return CheckResult.failed(
            TLS_BINDING, f"the connection presented SPKI {live.hex()}, but no attested TLS key binds it"
        )
    if live.hex() != attested:
        return CheckResult.failed(
            TLS_BINDING,
            f"the connection presented SPKI {live.hex()}, the attested TLS key is {attested}: "
            "a TLS-terminating relay (or another server) answered",
        )
    assert pin is not None
    pin.pin(live)  # every later connection must present the same key, checked at handshake
    return CheckResult.passed(TLS_BINDING, f"the live TLS key (SPKI {attested}) is the attested one; pinned")


def verify_url(
    base_url: str,
    model: str,
    policy: VerificationPolicy,
    *,
    verifier: Verifier,
    client: httpx.Client | None = None,
    api_key: str | None = None,
    collateral: Any = None,
    pccs_url: str | None = None,
    now: int | None = None,
    prompt: str = DEFAULT_PROMPT,
    signing_algo: str = "ecdsa",
    nras_client: Any = None,
    pin: SpkiPin | None = None,
    rims: Sequence[Any] = (),
    rim_client: Any = None,
    ocsp_client: Any = None,
) -> VerificationResult:
    """Verify a live endpoint: its report under ``policy``, then one signed completion.

    ``client`` (with the ``pin`` its TLS context uses, for https) lets a test route requests to
    an in-process app; otherwise one is made for ``base_url``. The completion's signer must be
    the key the verified quote binds.
    """
    secure = base_url.lower().startswith("https://")
    if not secure and TLS_BINDING not in policy.relax:
        refused = CheckResult.failed(
            TLS_BINDING,
            f"refusing plain {base_url.split(':', 1)[0]}: the report, prompt and completion would cross "
            "the network in clear, and nothing ties the connection to the attested server; use https "
            "(or --allow-plaintext for loopback development)",
        )
        return VerificationResult((refused,), policy.relax)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    own = client is None
    if own and secure:
        pin = SpkiPin()
    if client is None:
        # One connection, kept alive: the report and the completion come from the same peer.
        client = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=60.0,
            verify=pin.context if pin is not None else True,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )  # fmt: skip
    http = client
    try:
        nonce = os.urandom(32)
        params = {"model": model, "nonce": nonce.hex(), "signing_algo": signing_algo}
        if secure:
            params["include_tls_fingerprint"] = "true"
        report, error = _get_json(http, "/v1/attestation/report", params)
        if error:
            return VerificationResult((CheckResult.failed(REPORT_FETCH, error),), policy.relax)
        result = verifier.verify_report(
            report,
            policy,
            nonce=nonce,
            model=model,
            collateral=collateral,
            pccs_url=pccs_url,
            now=now,
            signing_algo=signing_algo,
            nras_client=nras_client,
            tls_layout=True if secure else None,
            rims=rims,
            rim_client=rim_client,
            ocsp_client=ocsp_client,
        )
        fetched = CheckResult.passed(REPORT_FETCH, f"{base_url} answered for nonce {nonce.hex()}")
        binding = _tls_binding(secure, pin, result.attested.get("tls_cert_fingerprint"))
        result = VerificationResult(
            (fetched, *result.checks, binding), result.relaxed, result.simulated, result.attested
        )
        if secure and binding.status is not Status.PASS:
            return result  # not one more byte to a peer that is not the attested server
        # Only what report_data bound may vouch for a signature: for ecdsa the address, for ed25519
        # the public key, and only when the report is for the algorithm we asked for.
        identities = attested_identities(result.attested, signing_algo)
        if not identities:
            missing = f"no attested {signing_algo} key (report_data did not bind one)"
            return result.extended([CheckResult.failed(SIGNATURE, missing)])
        return result.extended(_completion(http, model, prompt, signing_algo, identities))
    finally:
        if own:
            http.close()
