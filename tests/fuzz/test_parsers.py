"""Hypothesis on every parser a client (or a hostile engine, or a forged report) can feed.

Bounded examples in `make test` (the default profile); `make fuzz` runs the deep profile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re

import anyio
import httpx
from hypothesis import assume, given
from hypothesis import strategies as st

from support.scripted import REQUEST, _stream_body, scripted_engine
from tee_inference.attestation.eventlog import load_event_log
from tee_inference.attestation.tdx_quote import load_quote, parse_quote
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.envelope import normalize_error
from tee_inference.exceptions import FormatError
from tee_inference.jsondepth import nesting_exceeds
from tee_inference.middleware import SigningMiddleware
from tee_inference.reports import parse_nonce
from tee_inference.services import Services
from tee_inference.sse import DONE_EVENT, DoneSplitter, StreamIdScanner, completion_fields_from_json
from tee_inference.store import MemorySignatureStore, is_storable_id

MODEL = "fake-model"
SERVICES: Services = boot(ServerConfig.build(served_models=(MODEL,), max_request_bytes=1 << 16))


def _cuts(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=12).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)]
    )


@given(st.data())
def test_done_splitter_and_id_scanner_agree_with_every_chunking(data: st.DataObject) -> None:
    body = _stream_body()
    pieces = data.draw(_cuts(body))
    splitter, scanner, released = DoneSplitter(), StreamIdScanner(), bytearray()
    done = None
    for piece in pieces:
        ready, done = splitter.feed(piece)
        released += ready
        scanner.feed(ready)
        if done is not None:
            break
    assert done == DONE_EVENT
    assert bytes(released) + done == body  # nothing lost, nothing reordered, [DONE] held back
    assert scanner.completion_id == "chatcmpl-feedbeef"


@given(st.binary(max_size=300), st.data())
def test_done_splitter_never_loses_or_invents_bytes(prefix: bytes, data: st.DataObject) -> None:
    body = prefix + data.draw(st.sampled_from([b"", DONE_EVENT, b"\n\n" + DONE_EVENT, b"data: [DO"]))
    splitter, out = DoneSplitter(), bytearray()
    for piece in data.draw(_cuts(body)):
        ready, done = splitter.feed(piece)
        out += ready
        if done is not None:
            out += done
            assert done.startswith(DONE_EVENT)
            at = len(out) - len(done)
            assert at == 0 or bytes(out[:at]).endswith(b"\n\n")
            return
    out += splitter.flush()
    assert bytes(out) == body


_EVENTISH = st.lists(
    st.sampled_from([b"data: ", b"[DONE]", b"{}", b"\n", b"\n\n", b"\r", b"x", b"d", DONE_EVENT]), max_size=8
).map(b"".join)


@given(st.lists(_EVENTISH, max_size=8))
def test_done_splitter_fast_check_agrees_with_feed(chunks: list[bytes]) -> None:
    # `passes` is the middleware's one-frame path per event: whenever it says a chunk goes out as
    # it is, `feed` on a twin splitter releases that chunk whole and finds no [DONE].
    fast, reference = DoneSplitter(), DoneSplitter()
    for chunk in chunks:
        if fast.passes(chunk):
            assert reference.feed(chunk) == (chunk, None)
        else:
            assert fast.feed(chunk) == reference.feed(chunk)
    assert fast.flush() == reference.flush()


@given(st.binary(max_size=2000))
def test_id_scanner_and_json_fields_never_raise(data: bytes) -> None:
    scanner = StreamIdScanner(limit=512)
    scanner.feed(data)
    completion_fields_from_json(data)


def _reference_depth(text: str) -> int:
    value = json.loads(text)

    def depth(v: object) -> int:
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        return 0

    return depth(value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=4), inner, max_size=3)
    ),
    max_leaves=40,
)


@given(json_values, st.integers(0, 12))
def test_nesting_bound_matches_a_real_parse(value: object, limit: int) -> None:
    text = json.dumps(value)
    assert nesting_exceeds(text.encode(), limit) == (_reference_depth(text) > limit)


@given(st.text(max_size=80))
def test_nonce_parameter(value: str) -> None:
    try:
        nonce = parse_nonce(value)
    except ValueError:
        assert not re.fullmatch(r"[0-9a-fA-F]{64}", value)
        return
    assert nonce is not None and len(nonce) == 32 and nonce.hex() == value.lower()


@given(st.text(max_size=300))
def test_storable_ids_are_exactly_the_fetchable_ones(value: str) -> None:
    assert is_storable_id(value) == bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,255}", value, re.ASCII))


@given(st.integers(100, 599), st.binary(max_size=500))
def test_any_engine_error_body_becomes_the_envelope(status: int, body: bytes) -> None:
    envelope, code = normalize_error(status, body)
    error = json.loads(envelope)["error"]
    assert error["status"] == status and error["code"] == code and isinstance(error["message"], str)


def _post(body: bytes, headers: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        app = SigningMiddleware(scripted_engine([_stream_body()]), services=SERVICES)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/chat/completions", content=body, headers=headers)

    return anyio.run(go)


header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@given(
    st.one_of(st.binary(max_size=400), json_values.map(lambda v: json.dumps(v).encode())),
    st.dictionaries(
        st.sampled_from(["content-type", "x-signature-inband", "authorization", "x-request-id", "accept"]),
        header_values,
    ),
)
def test_any_body_and_headers_get_a_2xx_or_a_4xx_envelope(body: bytes, headers: dict[str, str]) -> None:
    r = _post(body, headers)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["status"] == r.status_code and "Traceback" not in error["message"]


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
def test_a_signed_request_is_signed_over_its_exact_bytes(extra: dict[str, object]) -> None:
    assume("request_id" not in extra and "model" not in extra)
    SERVICES.store = MemorySignatureStore(ttl_s=1800, max_entries=4, max_bytes=1 << 16)  # ids repeat here
    body = json.dumps({"model": MODEL, "stream": True, **extra}).encode()
    r = _post(body, {"content-type": "application/json"})
    assert r.status_code == 200
    record = anyio.run(SERVICES.store.get, "chatcmpl-feedbeef")
    assert record is not None
    assert record.text == f"{hashlib.sha256(body).hexdigest()}:{hashlib.sha256(r.content).hexdigest()}"


@given(st.binary(max_size=1200))
def test_quote_parser_refuses_with_a_format_error_only(data: bytes) -> None:
    for parse in (parse_quote, load_quote):
        with contextlib.suppress(FormatError, ValueError):  # anything else escapes and fails
            parse(data)


@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300),
        st.lists(st.dictionaries(st.text(max_size=12), json_values, max_size=6), max_size=4),
    )
)
def test_event_log_parser_refuses_with_a_format_error_only(data: object) -> None:
    with contextlib.suppress(FormatError, ValueError):  # anything else escapes and fails
        load_event_log(data)  # type: ignore[arg-type]


def test_request_constant_is_a_stream_request() -> None:
    assert json.loads(REQUEST)["stream"] is True
