"""The endpoints the signing layer answers itself: signatures, the model list, metrics.

Each is a plain coroutine over (services, app, scope, send) so the middleware can answer
them in front of any engine, vLLM in-process included.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs

from tee_inference.asgi import ASGIApp, Scope, Send
from tee_inference.errors import normalize_error_body, send_error, send_json
from tee_inference.reports import SIGNING_ALGOS, ReportBusy, parse_nonce, report_json
from tee_inference.services import Services
from tee_inference.subrequest import call_app
from tee_inference.tee import TrustRootError

SIGNATURE_PREFIX = "/v1/signature/"
_COMPLETION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,255}")
_PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"


def query_params(scope: Scope) -> dict[str, str]:
    """First value of each query parameter; malformed encodings are ignored, not fatal."""
    raw = scope.get("query_string", b"").decode("latin-1")
    return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}


async def check_model_param(services: Services, app: ASGIApp, scope: Scope, send: Send) -> bool:
    """Refuse a `model` query parameter that names a model this server does not serve."""
    model = query_params(scope).get("model")
    if model is None:
        return True
    names = await services.models.names(app, scope)
    if names is not None and model in names:
        return True
    services.metrics.gate_rejections.labels("model_not_confidential").inc()
    await send_error(
        send,
        400,
        f"model {model!r} is not served by this confidential server",
        code="model_not_confidential",
        param="model",
    )
    return False


async def signature(services: Services, app: ASGIApp, scope: Scope, send: Send) -> None:
    completion_id = scope["path"][len(SIGNATURE_PREFIX) :]
    params = query_params(scope)
    algo = params.get("signing_algo", "ecdsa")
    if algo not in ("ecdsa", "ed25519"):
        await send_error(send, 400, "signing_algo must be 'ecdsa' or 'ed25519'", param="signing_algo")
        return
    if not await check_model_param(services, app, scope, send):
        return
    record = await services.store.get(completion_id) if _COMPLETION_ID.fullmatch(completion_id) else None
    if record is None:
        await send_error(
            send, 404, f"no signature for completion {completion_id[:64]!r}", code="signature_not_found"
        )
        return
    payload: dict[str, str] = {"text": record.text, "signing_algo": algo}
    if algo == "ecdsa":
        payload["signature"] = record.ecdsa.hex()
        payload["signing_address"] = record.signing_address
    else:
        payload["signature"] = record.ed25519.hex()
        payload["signing_public_key"] = record.ed25519_public_key.hex()
    await send_json(send, 200, json.dumps(payload, separators=(",", ":")).encode())


async def attestation_report(services: Services, app: ASGIApp, scope: Scope, send: Send) -> None:
    params = query_params(scope)
    try:
        nonce = parse_nonce(params.get("nonce"))
    except ValueError as exc:
        await send_error(send, 400, str(exc), param="nonce", code="invalid_nonce")
        return
    algo = params.get("signing_algo", "ecdsa")
    if algo not in SIGNING_ALGOS:
        await send_error(send, 400, "signing_algo must be 'ecdsa' or 'ed25519'", param="signing_algo")
        return
    if not await check_model_param(services, app, scope, send):
        return
    try:
        report = await services.attestation.report(nonce, algo)
    except ReportBusy as exc:
        await send_error(send, 503, str(exc), code="busy", extra_headers=[(b"retry-after", b"1")])
        return
    except TrustRootError as exc:
        await send_error(send, 503, f"attestation is unavailable: {exc}", code="attestation_unavailable")
        return
    await send_json(send, 200, report_json(report))


async def models(services: Services, app: ASGIApp, scope: Scope, send: Send) -> None:
    """The engine's model list, with each served base model marked confidential."""
    status, _, body = await call_app(app, scope, "GET", "/v1/models", limit=1 << 20)
    if status != 200:
        await send_json(send, status if status >= 400 else 502, normalize_error_body(status, body))
        return
    try:
        listing = json.loads(body)
        entries = listing["data"]
        if not isinstance(entries, list):
            raise TypeError("data is not a list")
    except (ValueError, KeyError, TypeError):
        await send_error(send, 502, "the engine returned an unreadable model list")
        return
    known = await services.models.names(app, scope)
    info = services.model_info()
    for entry in entries:
        if isinstance(entry, dict) and known is not None and entry.get("id") in known:
            entry["confidential_compute"] = True
            entry.update(info)
    listing["data"] = [e for e in entries if isinstance(e, dict) and e.get("confidential_compute")]
    await send_json(send, 200, json.dumps(listing, separators=(",", ":")).encode())


async def metrics(services: Services, app: ASGIApp, scope: Scope, send: Send) -> None:
    """The engine's own metrics (vLLM's, when in-process or proxied) followed by ours."""
    status, _, engine_text = await call_app(app, scope, "GET", "/metrics", limit=16 << 20)
    body = (engine_text if status == 200 else b"") + services.metrics.render()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", _PROMETHEUS_TEXT),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
