"""The verifying client learns of a key that is no longer served from the refusal, attests again, reseals.

An encrypted request sealed to a key that went away (its node left the gateway's verified set, or
the server restarted with a new body key over plain http) is refused before any engine sees it:
the client attests again and sends it once more, sealed to a key that is served now.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from support.nodes import MODEL, expected_file, gateway, gateway_config, node, wait_until
from tee_inference.client import AsyncAttestedClient, AttestedClient
from tee_inference.client.checks import AttestedNode
from tee_inference.client.session import is_stale_key_refusal

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "sealed"}], "max_tokens": 4}


def _client(url: str, tmp_path: Path, **options: Any) -> AttestedClient:
    return AttestedClient(
        url, model=MODEL, expect=expected_file(tmp_path), allow_simulated=True, allow_plaintext=True,
        encrypt=True, timeout=30, **options,
    )  # fmt: skip


def test_only_refusals_before_decryption_count() -> None:
    envelope = {"error": {"message": "m", "type": "invalid_request_error", "code": "node_not_verified"}}
    assert is_stale_key_refusal(400, json.dumps(envelope).encode())
    envelope["error"]["code"] = "e2ee_key_mismatch"
    assert is_stale_key_refusal(422, json.dumps(envelope).encode())
    assert not is_stale_key_refusal(400, json.dumps(envelope).encode())
    envelope["error"]["code"] = "e2ee_replay"
    assert not is_stale_key_refusal(409, json.dumps(envelope).encode())
    assert not is_stale_key_refusal(400, b"not json")
    assert not is_stale_key_refusal(422, b"[]")


def test_a_server_restarted_with_a_new_body_key(tmp_path: Path) -> None:
    with ExitStack() as stack:
        first = stack.enter_context(node())
        with _client(first.url, tmp_path) as client:
            assert client.post(f"{first.url}/v1/chat/completions", json=BODY).status_code == 200
            old = client.attestation
            assert old is not None
            port = first.port
            stack.close()
            with node(port=port) as again:
                assert again.address != first.address
                answer = client.post(f"{again.url}/v1/chat/completions", json=BODY)
                assert answer.status_code == 200
                answer.read()  # the signature of the new key, over the resealed bytes, checks
                assert client.attestation is not old and client.attestation.identity == again.address
                # Sent twice: refused unopened (422, the old key), then resealed and served.
                assert len(again.watched.completions) == 2


def test_async_client_too(tmp_path: Path) -> None:
    async def run(url: str, restart: Any) -> int:
        async with AsyncAttestedClient(
            url, model=MODEL, expect=expected_file(tmp_path), allow_simulated=True, allow_plaintext=True,
            encrypt=True, timeout=30,
        ) as client:  # fmt: skip
            assert (await client.post(f"{url}/v1/chat/completions", json=BODY)).status_code == 200
            await asyncio.to_thread(restart)
            answer = await client.post(f"{url}/v1/chat/completions", json=BODY)
            await answer.aread()
            return answer.status_code

    holder: dict[str, Any] = {}
    with ExitStack() as later:
        with ExitStack() as stack:
            first = stack.enter_context(node())

            def restart() -> None:  # while the client holds the first boot's attestation
                stack.close()
                holder["again"] = later.enter_context(node(port=first.port))

            assert asyncio.run(run(first.url, restart)) == 200
        assert len(holder["again"].watched.completions) == 2  # refused unopened, then resealed


def test_through_the_gateway_a_node_that_left(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with node() as steady, ExitStack() as stack:
        leaving = stack.enter_context(node())
        config = gateway_config([steady.url, leaving.url], tmp_path)
        with gateway(config) as (url, app), _client(url, tmp_path, gateway=True) as client:
            client.attest()

            # Seal to the leaving node whenever the attestation still lists it.
            def prefer_leaving(nodes: Sequence[AttestedNode]) -> AttestedNode:
                return next((n for n in nodes if n.address == leaving.address), nodes[0])

            monkeypatch.setattr("tee_inference.client.session.secrets.choice", prefer_leaving)
            answer = client.post(f"{url}/v1/chat/completions", json=BODY)
            assert answer.status_code == 200 and answer.headers["x-tee-node"] == leaving.address
            answer.read()
            stack.close()  # the node goes away; the gateway takes it out of routing
            wait_until(lambda: not app.pool.nodes[1].verified)
            before = len(steady.watched.completions)
            answer = client.post(f"{url}/v1/chat/completions", json=BODY)
            assert answer.status_code == 200, answer.read()
            assert answer.headers["x-tee-node"] == steady.address
            answer.read()
            assert len(steady.watched.completions) == before + 1
            assert client.attestation is not None
            assert [n.identity for n in client.attestation.nodes] == [steady.address]


def test_other_refusals_are_handed_on(tmp_path: Path) -> None:
    with node() as running, _client(running.url, tmp_path) as client:
        # Refused by the node after decryption: sealed for us, and opened by the client.
        refused = client.post(f"{running.url}/v1/chat/completions", json={**BODY, "model": "other-model"})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "model_not_confidential"
    with node() as one, gateway(gateway_config([one.url], tmp_path)) as (url, _):
        with _client(url, tmp_path, gateway=True) as client:
            # Refused in clear by the gateway, and not about a stale key: read once, handed on as it came.
            refused = client.post(f"{url}/v1/chat/completions", json={**BODY, "model": "other-model"})
            assert refused.status_code == 400
            assert refused.json()["error"]["code"] == "model_not_confidential"
            assert "ehbp-response-nonce" not in refused.headers
        assert one.watched.completions == []
