"""The one error envelope of SPEC §6, as bytes and as an ASGI response.

Every layer answers errors through these functions, so a client sees one shape whether
the error came from the gate, the engine, FastAPI's validation or an unknown route.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from tee_inference.asgi import Send

# OpenAI's error `type` for each status class we answer.
_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

# A machine-readable `code` for errors that did not come with one.
_CODES: dict[int, str] = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    502: "engine_unavailable",
    503: "not_available",
    504: "engine_timeout",
}


# Errors that asking again cannot fix, although their status is one the OpenAI SDK retries (it
# retries 408, 409, 429 and every 5xx unless the answer says `x-should-retry: false`).
_PERMANENT_CODES = frozenset({"not_available"})


def should_retry(status: int, code: str) -> bool:
    """Whether a client may usefully send the same request again (load, timeouts, a sick engine)."""
    if status in (408, 409, 429):
        return True
    return status >= 500 and code not in _PERMANENT_CODES


def error_headers(status: int, code: str) -> list[tuple[bytes, bytes]]:
    """`x-should-retry: false` on a permanent error, so that no SDK retries it three times."""
    return [] if should_retry(status, code) else [(b"x-should-retry", b"false")]


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def default_code(status: int) -> str:
    if status in _CODES:
        return _CODES[status]
    if status in HTTPStatus._value2member_map_:
        return HTTPStatus(status).phrase.lower().replace(" ", "_")
    return "error"


def error_payload(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type_: str | None = None,
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type_ or error_type(status),
            "param": param,
            "code": code or default_code(status),
            "status": status,
        }
    }


def error_body(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type_: str | None = None,
) -> bytes:
    payload = error_payload(status, message, code=code, param=param, type_=type_)
    # backslashreplace: a lone surrogate (valid in a JSON string, not in UTF-8) becomes the JSON
    # escape `\udXXX` instead of an encoding error.
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "backslashreplace")


def json_headers(body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    return headers + (extra or [])


async def send_json(
    send: Send, status: int, body: bytes, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": json_headers(body, extra_headers)}
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    send: Send,
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    code = code or default_code(status)
    body = error_body(status, message, code=code, param=param)
    await send_json(send, status, body, [*error_headers(status, code), *(extra_headers or [])])


async def send_normalized_error(send: Send, status: int, body: bytes) -> None:
    """Answer an engine's (or a framework's) error body as the envelope, with its retry header."""
    envelope, code = normalize_error(status, body)
    await send_json(send, status, envelope, error_headers(status, code))


def normalize_error_body(status: int, body: bytes) -> bytes:
    return normalize_error(status, body)[0]


def normalize_error(status: int, body: bytes) -> tuple[bytes, str]:
    """Rewrite any error body (vLLM's, Starlette's plain text, FastAPI's `detail`) into the envelope.

    Only the message is kept from foreign shapes, and only when it is a short string: a
    framework's debug output must never reach the client.
    """
    message: str | None = None
    code: str | None = None
    param: str | None = None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        nested = value.get("error")
        inner: dict[str, Any] = nested if isinstance(nested, dict) else value
        if isinstance(inner.get("message"), str):
            message = inner["message"]
        elif isinstance(inner.get("detail"), str):
            message = inner["detail"]
        if isinstance(inner.get("code"), str):
            code = inner["code"]
        if isinstance(inner.get("param"), str):
            param = inner["param"]
    if message is None or len(message) > 2000:
        message = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    code = code or default_code(status)
    return error_body(status, message, code=code, param=param), code
