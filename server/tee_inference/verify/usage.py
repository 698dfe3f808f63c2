"""Signed usage (usage.py) checked by a client or a billing gateway: who counted what, for which id.

Input is the JSON a node or gateway answers at ``GET /v1/signature/{id}`` (or ``/v1/usage/{ref}``)::

    {"usage": {"prompt_tokens": 42, "completion_tokens": 17, "total_tokens": 59, "source": "engine"},
     "usage_text": "chatcmpl-…:42:17:engine", "usage_signature": "<hex>", "signing_address": "0x…"}

and the identity the caller trusts for that node (the attested ecdsa address or ed25519 key).
The numbers that count are the signed text's; the ``usage`` object must agree with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from tee_inference.usage import Usage
from tee_inference.verify.results import CheckResult, Status
from tee_inference.verify.signature import verify_signature

USAGE_FORMAT: Final = "usage_format"
USAGE_SIGNATURE: Final = "usage_signature"


def verify_usage(
    record: Mapping[str, Any],
    *,
    address: str | None = None,
    public_key: str | None = None,
    completion_id: str | None = None,
) -> tuple[Usage | None, list[CheckResult]]:
    """The usage the record proves, and the checks (``usage_format``, ``usage_signature``).

    The usage comes back only when both passed: signed by exactly this identity, for
    ``completion_id`` when one is given.
    """
    text = record.get("usage_text")
    usage = Usage.from_text(text) if isinstance(text, str) else None
    if usage is None:
        return None, [
            CheckResult.failed(
                USAGE_FORMAT, f"usage_text {str(text)[:120]!r} is not id:prompt:completion:source"
            ),
            CheckResult.skipped(USAGE_SIGNATURE, "no usage text to check"),
        ]
    problem = _disagreement(record.get("usage"), usage)
    if completion_id is not None and usage.completion_id != completion_id:
        problem = f"the usage is for {usage.completion_id}, not {completion_id}"
    fmt = (
        CheckResult.failed(USAGE_FORMAT, problem)
        if problem
        else CheckResult.passed(
            USAGE_FORMAT,
            f"{usage.completion_id}: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion "
            f"tokens ({usage.source})",
        )
    )
    signature = str(record.get("usage_signature", ""))
    if not signature:
        check = CheckResult.failed(USAGE_SIGNATURE, "the record carries no usage_signature")
    else:
        check = verify_signature(usage.text, signature, address=address, public_key=public_key)
        # The same check as a completion's signature, under its own name and without the note that
        # this text is not a sha256:sha256 one (it never is).
        detail = check.detail.split(" (note:")[0]
        check = CheckResult(USAGE_SIGNATURE, check.status, detail)
    ok = fmt.status is Status.PASS and check.status is Status.PASS
    return (usage if ok else None), [fmt, check]


def _disagreement(shown: object, usage: Usage) -> str | None:
    """The unsigned ``usage`` object, when present, must say what the signed text says."""
    if shown is None:
        return None
    if not isinstance(shown, Mapping):
        return "usage is not an object"
    for name, value in (
        ("prompt_tokens", usage.prompt_tokens),
        ("completion_tokens", usage.completion_tokens),
        ("source", usage.source),
    ):
        if name in shown and shown[name] != value:
            return f"usage.{name} is {shown[name]!r}, the signed text says {value!r}"
    return None
