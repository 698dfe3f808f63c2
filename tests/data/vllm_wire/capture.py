"""Capture vLLM's exact wire format into this folder (see README.md for how it was run).

    python tests/data/vllm_wire/capture.py http://127.0.0.1:8011 [OUT_DIR]

For every case it writes:
  NAME.request.json   method, path, request headers we set, and the exact request body (text)
  NAME.response.json  HTTP version, status, reason, response headers in wire order (as pairs),
                      and for streams the sizes of the chunks received
  NAME.body           the exact response body bytes (after de-chunking, before any parsing)

httpx's iter_raw yields what the socket read delivered, which may merge or split server writes,
so stream cases are also fetched once more over a plain socket and the HTTP/1.1 chunked framing
is parsed: `wire_chunks` lists the size of each transfer-encoding chunk, i.e. of each
http.response.body message the ASGI app sent (uvicorn writes one chunk per message).
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

MODEL = "SmolLM2-135M-Instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
CHAT_UNICODE = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Écris « café » et 漢字, s'il te plaît."}],
}
COMPLETION = {"model": MODEL, "prompt": "The capital of France is"}
GREEDY = {"temperature": 0, "max_tokens": 16}
SHORT = {"temperature": 0, "max_tokens": 8}


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


JSON_HEADERS = {"content-type": "application/json"}

# name, method, path, body (bytes or None), extra headers, is_stream
CASES: list[tuple[str, str, str, bytes | None, dict[str, str], bool]] = [
    ("chat", "POST", "/v1/chat/completions", _json({**CHAT, **GREEDY}), JSON_HEADERS, False),
    ("chat_stream", "POST", "/v1/chat/completions", _json({**CHAT, **GREEDY, "stream": True}), JSON_HEADERS, True),
    (
        "chat_stream_usage", "POST", "/v1/chat/completions",
        _json({**CHAT, **GREEDY, "stream": True, "stream_options": {"include_usage": True}}), JSON_HEADERS, True,
    ),
    ("chat_unicode", "POST", "/v1/chat/completions", _json({**CHAT_UNICODE, **GREEDY}), JSON_HEADERS, False),
    (
        "chat_unicode_stream", "POST", "/v1/chat/completions",
        _json({**CHAT_UNICODE, **GREEDY, "stream": True}), JSON_HEADERS, True,
    ),
    ("completion", "POST", "/v1/completions", _json({**COMPLETION, **SHORT}), JSON_HEADERS, False),
    (
        "completion_stream", "POST", "/v1/completions",
        _json({**COMPLETION, **SHORT, "stream": True}), JSON_HEADERS, True,
    ),
    (
        "completion_stream_usage", "POST", "/v1/completions",
        _json({**COMPLETION, **SHORT, "stream": True, "stream_options": {"include_usage": True}}),
        JSON_HEADERS, True,
    ),
    # Errors.
    (
        "error_unknown_model", "POST", "/v1/chat/completions",
        _json({**CHAT, "model": "no-such-model", **GREEDY}), JSON_HEADERS, False,
    ),
    (
        "error_unknown_model_completion", "POST", "/v1/completions",
        _json({**COMPLETION, "model": "no-such-model", **SHORT}), JSON_HEADERS, False,
    ),
    (
        "error_unknown_model_stream", "POST", "/v1/chat/completions",
        _json({**CHAT, "model": "no-such-model", **GREEDY, "stream": True}), JSON_HEADERS, False,
    ),
    ("error_malformed_json", "POST", "/v1/chat/completions", b'{"model": "SmolLM2-135M-Instruct", "messages": [', JSON_HEADERS, False),
    ("error_max_tokens_negative", "POST", "/v1/chat/completions", _json({**CHAT, "max_tokens": -1}), JSON_HEADERS, False),
    ("error_messages_missing", "POST", "/v1/chat/completions", _json({"model": MODEL, "max_tokens": 8}), JSON_HEADERS, False),
    ("error_prompt_missing", "POST", "/v1/completions", _json({"model": MODEL, "max_tokens": 8}), JSON_HEADERS, False),
    (
        "error_context_too_long", "POST", "/v1/completions",
        _json({**COMPLETION, "max_tokens": 100000, "temperature": 0}), JSON_HEADERS, False,
    ),
    ("error_wrong_content_type", "POST", "/v1/chat/completions", _json({**CHAT, **SHORT}), {"content-type": "text/plain"}, False),
    ("error_empty_body", "POST", "/v1/chat/completions", b"", JSON_HEADERS, False),
    ("error_unknown_route", "GET", "/v1/nope", None, {}, False),
    ("error_unknown_route_post", "POST", "/v1/nope", b"{}", JSON_HEADERS, False),
    ("error_wrong_method", "GET", "/v1/chat/completions", None, {}, False),
    ("error_embeddings", "POST", "/v1/embeddings", _json({"model": MODEL, "input": "x"}), JSON_HEADERS, False),
    # Other endpoints.
    ("models", "GET", "/v1/models", None, {}, False),
    ("health", "GET", "/health", None, {}, False),
    ("version", "GET", "/version", None, {}, False),
    ("ping", "GET", "/ping", None, {}, False),
    ("metrics", "GET", "/metrics", None, {}, False),
]  # fmt: skip

METRICS_LIMIT = 2048


def dump_meta(meta: dict[str, Any]) -> str:
    """JSON with one header pair and one size list per line, so diffs stay readable."""
    lines = ["{"]
    items = list(meta.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if key == "headers":
            pairs = [json.dumps(pair, ensure_ascii=False) for pair in value]
            lines.append(' "headers": [\n  ' + ",\n  ".join(pairs) + f"\n ]{comma}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}{comma}")
    return "\n".join(lines) + "\n}\n"


def raw_chunks(base: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> list[int]:
    """Sizes of the HTTP/1.1 transfer-encoding chunks of one response, read off a plain socket."""
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    head = [
        f"{method} {path} HTTP/1.1",
        f"host: {host}:{port}",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    data = b""
    with socket.create_connection((host, port), timeout=120) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        while chunk := s.recv(65536):
            data += chunk
    header_block, _, rest = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in header_block.lower():
        return [len(rest)]
    sizes = []
    while rest:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            break
        sizes.append(size)
        rest = rest[size + 2 :]
    return sizes


def capture(base: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with httpx.Client(base_url=base, timeout=120) as client:
        for name, method, path, body, headers, is_stream in CASES:
            request = client.build_request(method, path, content=body, headers=headers)
            response = client.send(request, stream=True)
            chunks: list[bytes] = []
            try:
                for chunk in response.iter_raw():
                    chunks.append(chunk)
                    if name == "metrics" and sum(map(len, chunks)) >= METRICS_LIMIT:
                        break
            finally:
                response.close()
            payload = b"".join(chunks)
            if name == "metrics":
                payload = payload[:METRICS_LIMIT]
            meta: dict[str, Any] = {
                "http_version": response.http_version,
                "status": response.status_code,
                "reason": response.reason_phrase,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in response.headers.raw],
                "body_bytes": len(payload),
            }
            if name == "metrics":
                meta["truncated_to"] = METRICS_LIMIT
            if is_stream:
                meta["iter_raw_chunks"] = [len(c) for c in chunks]
                meta["wire_chunks"] = raw_chunks(base, method, path, body or b"", headers)
                meta["sse_events"] = payload.count(b"\n\n")
            (out / f"{name}.request.json").write_text(
                json.dumps(
                    {
                        "method": method,
                        "path": path,
                        "headers": headers,
                        "body": None if body is None else body.decode("utf-8"),
                    },
                    indent=1,
                    ensure_ascii=False,
                )
                + "\n",
                encoding="utf-8",
            )
            (out / f"{name}.response.json").write_text(dump_meta(meta), encoding="utf-8")
            (out / f"{name}.body").write_bytes(payload)
            print(f"{name:34} {response.status_code} {len(payload):6d} B", file=sys.stderr)


if __name__ == "__main__":
    capture(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent)
