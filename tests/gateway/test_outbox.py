"""The usage outbox: rows are durable before anything is reported, and survive a restart."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx

from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.gateway.outbox import Exchange, Outbox, Reporter, UsageSink
from tee_inference.middleware import SigningMiddleware
from tee_inference.usage import Usage, sign_usage
from tee_inference.verify.usage import verify_usage

MODEL = "fake-model"


def test_rows_survive_a_restart_and_are_reported_with_the_nodes_signed_usage(tmp_path: Path) -> None:
    services = boot(ServerConfig.build(served_models=(MODEL,)))
    address = services.signer.ecdsa.address
    path, log = tmp_path / "outbox.db", tmp_path / "usage.jsonl"
    now = [1e10]
    first = Outbox(path, clock=lambda: now[0])
    anyio.run(first.record, Exchange("ref-1", "alice", MODEL, "http://node-a", address, 200, True, True))
    anyio.run(first.record, Exchange("ref-2", "bob", MODEL, "http://node-a", address, 429, False, False))
    first.close()  # the gateway stops before reporting anything

    again = Outbox(path, clock=lambda: now[0])
    assert again.count("pending") == 1 and again.count("ready") == 1  # an error consumed nothing

    async def scenario() -> None:
        app = SigningMiddleware(FakeEngine(MODEL), services=services)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://node-a"
        ) as client:
            reporter = Reporter(
                again, UsageSink(None, log), lambda url: client, wait_s=30, clock=lambda: now[0]
            )
            await reporter.step()  # the node has no usage for ref-1 yet: it waits
            assert again.count("pending") == 1
            signed = sign_usage(services.signer, Usage("chatcmpl-abc", 12, 7, "engine"))
            await services.usage.put(signed, "ref-1")
            now[0] += 60  # past the retry backoff
            await reporter.step()
            await reporter.step()
            assert reporter.reported == 2

    anyio.run(scenario)
    assert again.count("reported") == 2
    records = {r["ref"]: r for r in map(json.loads, log.read_text().splitlines())}
    usage, checks = verify_usage(records["ref-1"]["usage"], address=address, completion_id="chatcmpl-abc")
    assert usage is not None and usage.completion_tokens == 7, checks
    assert records["ref-1"]["encrypted"] is True and records["ref-1"]["tenant"] == "alice"
    assert records["ref-2"]["usage"] is None and records["ref-2"]["status"] == 429


def test_a_node_that_never_answers_is_reported_without_usage_and_a_broken_sink_keeps_rows(
    tmp_path: Path,
) -> None:
    now = [1e10]
    outbox = Outbox(tmp_path / "outbox.db", clock=lambda: now[0])
    anyio.run(
        outbox.record, Exchange("ref-9", None, MODEL, "http://gone", "0x" + "00" * 20, 200, False, False)
    )
    broken = UsageSink(None, tmp_path / "missing-dir" / "usage.jsonl")
    reporter = Reporter(outbox, broken, lambda url: None, wait_s=30, clock=lambda: now[0])
    anyio.run(reporter.step)
    assert outbox.count("pending") == 1
    now[0] += 31
    anyio.run(reporter.step)  # given up on the usage; the sink cannot be written: the row stays
    assert outbox.count("ready") == 1 and reporter.reported == 0
    reporter.sink = UsageSink(None, tmp_path / "usage.jsonl")
    anyio.run(reporter.step)
    assert outbox.count("reported") == 1
    assert json.loads((tmp_path / "usage.jsonl").read_text())["usage"] is None
