"""Forwarding one completion to a verified node: the client's bytes in, the node's bytes out.

The request body is read whole (bounded) to learn the model, then sent to the node as it came;
the node's status, signature headers and body go back as they came, chunk by chunk as they
arrive, so the client hashes exactly the bytes the node signed (encrypted bodies included, which
the gateway cannot read). The gateway adds headers only: ``X-RateLimit-*``, ``X-Tee-Node`` (the
serving node's attested address) and, toward the node, its own bearer token, ``X-Tee-Tenant``
(the caller's tenant, for the node's cache salt) and ``X-Tee-Usage-Ref`` (to fetch the node's
signed usage afterwards). Headers a client sends under those names are dropped.

Routing: an encrypted body goes to the node whose key it was sealed to (``X-Tee-Node: <address>``,
or the only node serving the model); anything else to the least busy verified node for the model,
optionally sticky per caller. A node that refuses the connection because its TLS key changed, or
answers under another signing address, is taken out of routing and the request goes to another
verified node, once; the answer of an unverified key is never forwarded.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Final

import anyio
import httpx

from tee_inference.asgi import BodyTooLarge, Receive, Scope, Send, header, read_body
from tee_inference.e2ee import ENC_HEADER
from tee_inference.envelope import send_error
from tee_inference.gateway.config import Caller
from tee_inference.gateway.limits import Verdict
from tee_inference.gateway.nodes import Node, NodePool, pin_failed
from tee_inference.gateway.outbox import Exchange, Outbox

log = logging.getLogger("tee_inference.gateway.forward")

NODE_HEADER: Final = b"x-tee-node"
AFFINITY_HEADER: Final = b"x-tee-affinity"
# What the node needs of the client's request headers; the rest is the gateway's business.
_FORWARDED: Final = frozenset(
    {b"content-type", b"accept", ENC_HEADER, b"x-tee-model", b"x-signature-inband", b"user-agent"}
)
# Hop-by-hop and framing headers are the servers' business on each leg.
_DROPPED_ANSWER: Final = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date"})


async def read_body_within(receive: Receive, limit: int, timeout_s: float) -> bytes | int | None:
    """The whole body; an int status (413, 408) when it cannot be had; None if the client left."""
    try:
        with anyio.fail_after(timeout_s):
            return await read_body(receive, limit)
    except BodyTooLarge:
        return 413
    except TimeoutError:
        return 408


def routing_model(scope: Scope, body: bytes) -> str | None:
    """The model to route by: ``X-Tee-Model`` (the node checks it names the body's model), else the
    plaintext body's ``model``."""
    named = header(scope, b"x-tee-model")
    if named is not None:
        return named.decode("utf-8", "replace")
    if header(scope, ENC_HEADER) is not None:
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):
        return None
    return model if isinstance(model, str) else None


class Forwarder:
    def __init__(self, pool: NodePool, outbox: Outbox, *, response_timeout_s: float) -> None:
        self.pool = pool
        self.outbox = outbox
        self.response_timeout_s = response_timeout_s

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        model: str,
        caller: Caller,
        limit: Verdict,
    ) -> None:
        encrypted = header(scope, ENC_HEADER) is not None
        named = header(scope, NODE_HEADER)
        tried: list[Node] = []
        for _ in range(2):
            node = self._node(model, named, encrypted, caller, scope, tried)
            if node is None:
                await self._no_node(send, model, named, encrypted, bool(tried), limit)
                return
            tried.append(node)
            if await self._exchange(node, scope, receive, send, body, model, caller, limit, encrypted):
                return
        await send_error(
            send,
            503,
            "no verified node could take the request; retry shortly",
            code="no_verified_node",
            extra_headers=[(b"retry-after", b"1"), *limit.headers()],
        )

    def _node(
        self,
        model: str,
        named: bytes | None,
        encrypted: bool,
        caller: Caller,
        scope: Scope,
        tried: list[Node],
    ) -> Node | None:
        if named is not None:
            node = self.pool.by_address(named.decode("latin-1"))
            return (
                node if node is not None and node not in tried and node in self.pool.verified(model) else None
            )
        if encrypted:
            serving = self.pool.verified(model)
            # Sealed to one node's key: with one candidate it can only be that one.
            return serving[0] if len(serving) == 1 and serving[0] not in tried else None
        affinity = header(scope, AFFINITY_HEADER)
        key = affinity.decode("latin-1") if affinity else caller.tenant
        return self.pool.choose(model, key, exclude=tried)

    async def _no_node(
        self, send: Send, model: str, named: bytes | None, encrypted: bool, retried: bool, limit: Verdict
    ) -> None:
        extra = limit.headers()
        if retried:
            await send_error(
                send,
                503,
                "no other verified node could take the request; retry shortly",
                code="no_verified_node",
                extra_headers=[(b"retry-after", b"1"), *extra],
            )
        elif not self.pool.verified(model):
            await send_error(
                send,
                400,
                f"model {model[:200]!r} is not served by a verified confidential node",
                code="model_not_confidential",
                param="model",
                extra_headers=extra,
            )
        elif named is not None:
            await send_error(
                send,
                400,
                "X-Tee-Node names no verified node serving this model: attest again",
                code="node_not_verified",
                extra_headers=extra,
            )
        else:
            assert encrypted
            await send_error(
                send,
                400,
                "an encrypted body is sealed to one node's key: name it in X-Tee-Node",
                code="node_required",
                extra_headers=extra,
            )

    async def _exchange(
        self,
        node: Node,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        model: str,
        caller: Caller,
        limit: Verdict,
        encrypted: bool,
    ) -> bool:
        """True once the exchange is over (answered, or the client left); False to try another node."""
        identity = node.identity
        assert identity is not None
        ref = secrets.token_hex(16)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k in _FORWARDED]
        headers += [("x-tee-usage-ref", ref), ("accept-encoding", "identity")]
        if caller.tenant is not None:
            headers.append(("x-tee-tenant", caller.tenant))
        request = node.client.build_request("POST", scope["path"], content=body, headers=headers)
        node.outstanding += 1
        status = 0
        streamed = False
        try:
            try:
                with anyio.fail_after(self.response_timeout_s):
                    response = await node.client.send(request, stream=True)
            except (httpx.HTTPError, TimeoutError) as exc:
                if pin_failed(exc):
                    self.pool.suspect(node, "its TLS key changed (the pinned handshake failed)")
                    return False  # not a byte was sent: another node may take it
                if isinstance(exc, httpx.ConnectError):
                    self.pool.suspect(node, "unreachable")
                    return False  # nor here: the connection never opened
                log.warning("node %s failed before answering: %s", node.url, type(exc).__name__)
                self.pool.suspect(node, f"a request failed ({type(exc).__name__})")
                await send_error(
                    send,
                    502,
                    "the node failed before answering",
                    code="node_unavailable",
                    extra_headers=limit.headers(),
                )
                return True
            try:
                signer = response.headers.get("x-signing-address")
                if response.status_code == 200 and signer != identity.address:
                    self.pool.suspect(node, f"it answered as {signer}, not the verified {identity.address}")
                    return False
                status = response.status_code
                streamed = response.headers.get("content-type", "").startswith("text/event-stream")
                await self._relay(response, receive, send, identity.address, limit)
            finally:
                await response.aclose()
            return True
        finally:
            node.outstanding -= 1
            if status:
                exchange = Exchange(
                    ref, caller.tenant, model, node.url, identity.address, status, streamed, encrypted
                )
                with anyio.CancelScope(shield=True):
                    await self.outbox.record(exchange)

    @staticmethod
    async def _relay(
        response: httpx.Response, receive: Receive, send: Send, address: str, limit: Verdict
    ) -> None:
        """The node's answer to the client, byte for byte; a client that leaves ends the node's request."""
        headers = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in _DROPPED_ANSWER]
        headers += [(NODE_HEADER, address.encode("ascii")), *limit.headers()]
        async with anyio.create_task_group() as tasks:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tasks.cancel_scope.cancel()  # closing the upstream response makes the node abort

            tasks.start_soon(watch)
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                log.warning("node connection broke during an answer: %s", type(exc).__name__)
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            tasks.cancel_scope.cancel()
