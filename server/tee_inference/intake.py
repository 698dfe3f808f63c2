"""The request side of a completion: its body, the confidential gate and admission control.

Everything here happens before the engine sees a byte, and everything is bounded: the body's
size (`max_request_bytes`, 413), the time it may take to arrive (`body_timeout_s`, 408), the
request-body bytes held across all connections (`max_inflight_request_bytes`, 429), its JSON
nesting (400), and the completions in flight or the engine's time to first token (429 with
`Retry-After`). The body is parsed only to be judged: the engine gets the exact bytes that
were hashed.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Final

import anyio

from tee_inference.asgi import ASGIApp, Receive, Scope, Send, header
from tee_inference.envelope import send_error
from tee_inference.jsondepth import MAX_JSON_DEPTH, nesting_exceeds
from tee_inference.services import Services

_CLOSE: Final = (b"connection", b"close")


class Intake:
    """One completion request on its way in; `release_body` once the exchange is over."""

    def __init__(self, services: Services, app: ASGIApp, scope: Scope, send: Send) -> None:
        self.services = services
        self.config = services.config
        self.app = app
        self.scope = scope
        self.client_send = send
        self.request_hash = hashlib.sha256()
        self.body_bytes = 0  # counted in the admission's bytes-in-flight bound until released
        self.admitted_at = 0.0
        self.request: dict[str, object] | None = None  # the parsed body, once the gate accepted it

    def release_body(self) -> None:
        self.services.admission.release_body(self.body_bytes)
        self.body_bytes = 0

    async def read_body(self, receive: Receive) -> bytes | None:
        """The whole body, bounded in size, in time and in bytes held across all requests."""
        limit = self.config.max_request_bytes
        declared = header(self.scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await send_error(
                self.client_send, 413, f"request body larger than {limit} bytes", extra_headers=[_CLOSE]
            )
            return None
        chunks: list[bytes] = []
        with anyio.move_on_after(self.config.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk: bytes = message.get("body", b"")
                if self.body_bytes + len(chunk) > limit:
                    await send_error(
                        self.client_send,
                        413,
                        f"request body larger than {limit} bytes",
                        extra_headers=[_CLOSE],
                    )
                    return None
                if not self.services.admission.reserve_body(len(chunk)):
                    await self.shed("body_bytes", "too many request bytes are in flight; retry shortly", 1)
                    return None
                self.body_bytes += len(chunk)
                self.request_hash.update(chunk)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        seconds = self.config.body_timeout_s
        await send_error(
            self.client_send,
            408,
            f"the request body did not arrive within {seconds:g} s",
            code="request_timeout",
            extra_headers=[_CLOSE],
        )
        return None

    async def gate(self, body: bytes) -> bool:
        """Only well-formed requests for a served, attested model reach the engine."""
        content_type = (header(self.scope, b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            await send_error(self.client_send, 415, "send the request body as application/json")
            return False
        if nesting_exceeds(body):
            message = f"request body nests deeper than {MAX_JSON_DEPTH} levels"
            await send_error(self.client_send, 400, message, code="invalid_json")
            return False
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            await send_error(self.client_send, 400, "request body is not valid JSON", code="invalid_json")
            return False
        if not isinstance(request, dict):
            await send_error(self.client_send, 400, "request body must be a JSON object", code="invalid_json")
            return False
        if "request_id" in request:
            # vLLM would build the completion id from it: ids are the server's to choose.
            await send_error(
                self.client_send,
                400,
                "'request_id' is not accepted: completion ids are chosen by the server",
                code="request_id_not_allowed",
                param="request_id",
            )
            return False
        model = request.get("model")
        if not isinstance(model, str):
            await send_error(self.client_send, 400, "'model' is required and must be a string", param="model")
            return False
        routed = header(self.scope, b"x-tee-model")
        if routed is not None and routed != model.encode("utf-8", "surrogatepass"):
            # The one field a gateway routes by without reading an encrypted body: it must not lie.
            await send_error(
                self.client_send,
                400,
                "X-Tee-Model does not name the body's model",
                code="model_header_mismatch",
            )
            return False
        served = await self.services.models.names(self.app, self.scope)
        if served is None:
            await send_error(
                self.client_send,
                503,
                "the engine is not ready or does not answer",
                code="engine_unavailable",
                extra_headers=[(b"retry-after", b"1")],
            )
            return False
        if model not in served:
            self.services.metrics.gate_rejections.labels("model_not_confidential").inc()
            await send_error(
                self.client_send,
                400,
                f"model {model[:200]!r} is not served by this confidential server",
                code="model_not_confidential",
                param="model",
            )
            return False
        self.request = request
        return True

    async def admit(self) -> bool:
        """Admission control: take the completion now, or shed it with 429 before the engine."""
        admission = self.services.admission
        refused = admission.admit()
        if refused is None:
            self.admitted_at = time.perf_counter()
            return True
        if refused == "inflight":
            message = "too many completions are in progress; retry shortly"
        else:
            message = "the engine is answering slowly; retry shortly"
        await self.shed(refused, message, admission.retry_after_s())
        return False

    async def shed(self, reason: str, message: str, retry_after_s: int) -> None:
        self.services.metrics.shed.labels(reason).inc()
        await send_error(
            self.client_send,
            429,
            message,
            code="server_busy",
            extra_headers=[(b"retry-after", str(retry_after_s).encode("ascii"))],
        )
