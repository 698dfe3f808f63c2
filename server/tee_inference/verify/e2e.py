"""End to end against a live server: a fresh nonce, a verified report, a signed completion.

The request body is serialized here and sent as raw bytes, and the response is read as raw bytes
before any JSON parsing: the hashes must be of exactly what crossed the wire (SPEC §2), so this
module never lets an HTTP library re-encode either side.
"""

from __future__ import annotations

import json
import os
from typing import Any, Final

import httpx

from tee_inference.signing import sha256_hex
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.results import CheckResult, VerificationResult
from tee_inference.verify.signature import SIGNATURE, verify_signature
from tee_inference.verify.verifier import Verifier

REPORT_FETCH, COMPLETION, SIGNATURE_TEXT = "report_fetch", "completion", "signature_text"
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


def _completion(client: httpx.Client, model: str, prompt: str, algo: str, identity: str) -> list[CheckResult]:
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
    if algo == "ecdsa":
        out.append(verify_signature(text, signature, address=identity))
    else:
        out.append(verify_signature(text, signature, public_key=identity))
    return out


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
) -> VerificationResult:
    """Verify a live endpoint: its report under ``policy``, then one signed completion.

    ``client`` lets a test route requests to an in-process app; otherwise one is made for
    ``base_url``. The completion's signer must be the address the verified quote binds.
    """
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    own = client is None
    http = client or httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=60.0)
    try:
        nonce = os.urandom(32)
        params = {"model": model, "nonce": nonce.hex(), "signing_algo": signing_algo}
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
        )
        fetched = CheckResult.passed(REPORT_FETCH, f"{base_url} answered for nonce {nonce.hex()}")
        result = VerificationResult(
            (fetched, *result.checks), result.relaxed, result.simulated, result.attested
        )
        # Only what report_data bound may vouch for a signature: for ecdsa the address, for ed25519
        # the public key, and only when the report is for the algorithm we asked for.
        field = "signing_address" if signing_algo == "ecdsa" else "signing_public_key"
        identity = result.attested.get(field) if result.attested.get("signing_algo") == signing_algo else None
        if not isinstance(identity, str):
            missing = f"no attested {signing_algo} key (report_data did not bind one)"
            return result.extended([CheckResult.failed(SIGNATURE, missing)])
        return result.extended(_completion(http, model, prompt, signing_algo, identity))
    finally:
        if own:
            http.close()
