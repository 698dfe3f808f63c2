"""Per-tenant prefix-cache partitions with vLLM's `cache_salt`, set by the node.

vLLM's prefix cache makes a request whose prompt prefix is cached measurably faster, so one tenant
can probe another's prompts by timing. Requests with different `cache_salt` values never share
KV blocks (the salt enters the hash of the first block), so each tenant gets its own partition.

Where: the node, inside the CVM. It is the only place that sees an encrypted body in clear, and the
only place a salt can stay secret. The gateway only *names* the tenant, in ``X-Tee-Tenant``, from
the caller's API key (it drops any ``X-Tee-Tenant`` a client sent); the node turns the name into
the salt with a key of this boot that never leaves the CVM:

    salt = base64url(HMAC-SHA256(cache_salt_key, "tenant:" ‖ tenant))     43 characters, 256 bits

so knowing a tenant's name is not knowing its salt. A node reached directly (no gateway) by
several parties should require its bearer token, so that only the gateway can name tenants.

What is signed: the signature covers the bytes the client sent (SPEC §2), unchanged. The engine
receives exactly those bytes with one member added before the body's final ``}``:

    engine body = body[:i] ‖ b',"cache_salt":"<salt>"' ‖ body[i:]      i = index of the last b"}"

No other byte moves: not the prompt, not a sampling parameter, not whitespace. So the signed
request is the client's, and what the engine saw is that request plus a salt that only selects a
cache partition; an auditor reconstructs the engine's body by this rule, except the salt (which is
the secret that keeps other tenants out). A body that carries its own ``cache_salt`` (a
caller-chosen partition, vLLM's own field) is left as it is: that salt is in the signed bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, Final

from tee_inference.asgi import Scope, header

TENANT_HEADER: Final = b"x-tee-tenant"
# Printable, no spaces, short: a label, never a secret (the gateway sends a key's name or hash).
_TENANT: Final = re.compile(rb"[A-Za-z0-9._:@+=-]{1,128}")
_TRAILING_SPACE: Final = b" \t\r\n"


def tenant_salt(key: bytes, tenant: str) -> str:
    digest = hmac.new(key, b"tenant:" + tenant.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def with_member(body: bytes, name: str, value: str) -> bytes | None:
    """``body`` with ``"name":"value"`` added as its last member, or None when it is not a
    UTF-8 JSON object we can extend byte-exactly (the request then goes unsalted)."""
    end = len(body.rstrip(_TRAILING_SPACE)) - 1
    if end < 1 or body[end : end + 1] != b"}" or body[end - 1 : end] == b"\x00":
        return None  # not an object, or UTF-16/32 JSON (which json.loads also accepts)
    empty = body[:end].rstrip(_TRAILING_SPACE).endswith(b"{")
    member = (b"" if empty else b",") + f'"{name}":"{value}"'.encode("ascii")
    return body[:end] + member + body[end:]


def tenant_of(scope: Scope) -> str | None:
    value = header(scope, TENANT_HEADER)
    if value is None or _TENANT.fullmatch(value) is None:
        return None
    return value.decode("ascii")


def partitioned(
    key: bytes,
    enabled: bool,
    scope: Scope,
    request: Mapping[str, Any] | None,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body and headers the engine gets: salted for the named tenant, else as they are."""
    tenant = tenant_of(scope) if enabled and key else None
    if tenant is None or request is None or "cache_salt" in request:
        return body, headers
    salted = with_member(body, "cache_salt", tenant_salt(key, tenant))
    if salted is None:
        return body, headers
    kept = [(k, v) for k, v in headers if k not in (b"content-length", b"transfer-encoding")]
    return salted, [*kept, (b"content-length", str(len(salted)).encode("ascii"))]
