"""The gateway's configuration: one typed object, built once from the command line.

API keys live in a file of their hashes (``--keys``), never in the configuration or a process's
arguments; the token the gateway presents to its nodes is named by an environment variable.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tee_inference.exceptions import ConfigError


class GatewayConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: tuple[str, ...] = Field(min_length=1)
    expect: tuple[Path, ...] = ()
    allow_simulated: bool = False
    no_measurements: bool = False
    # http:// nodes: nothing binds the connection to the node (loopback development only).
    allow_plaintext: bool = False
    allow_missing_collateral: bool = False
    pccs_url: str | None = None
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Bearer token the gateway presents to its nodes, read from this variable.
    node_api_key_env: str | None = None
    # API keys with their limits: {"keys": [{"name", "sha256", "requests_per_minute"?}]}.
    keys_file: Path | None = None
    requests_per_minute: int = Field(default=600, ge=1)
    # Route one caller's requests to one node while it is not much busier than the least busy.
    sticky: bool = False
    sticky_slack: int = Field(default=4, ge=0)
    reverify_s: float = Field(default=300.0, gt=0)
    probe_s: float = Field(default=5.0, gt=0)
    retry_s: float = Field(default=5.0, gt=0)
    outbox: Path = Path("gateway-outbox.sqlite3")
    usage_log: Path | None = None  # JSON lines; default beside the outbox (unless Redis takes them)
    usage_wait_s: float = Field(default=30.0, gt=0)
    max_request_bytes: int = Field(default=16 << 20, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    node_timeout_s: float = Field(default=10.0, gt=0)
    response_timeout_s: float = Field(default=900.0, gt=0)
    signature_ttl_s: float = Field(default=3600.0, ge=1800.0)

    @field_validator("nodes")
    @classmethod
    def _urls(cls, nodes: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(n.rstrip("/") for n in nodes)
        for url in cleaned:
            if not url.lower().startswith(("http://", "https://")):
                raise ValueError(f"a node is an http(s) URL, got {url!r}")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("a node is named twice")
        return cleaned

    @classmethod
    def build(cls, **values: object) -> GatewayConfig:
        try:
            config = cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            problems = (f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError("; ".join(problems)) from None
        plain = [n for n in config.nodes if n.lower().startswith("http://")]
        if plain and not config.allow_plaintext:
            raise ConfigError(
                f"refusing plain http node(s) {', '.join(plain)}: prompts would cross the network in clear "
                "and nothing binds the connection to the attested node; use https (or --allow-plaintext "
                "on loopback)"
            )
        if config.no_measurements and config.expect:
            raise ConfigError("--no-measurements and --expect contradict each other")
        return config

    def node_token(self) -> str | None:
        if self.node_api_key_env is None:
            return None
        value = os.environ.get(self.node_api_key_env, "")
        if not value:
            raise ConfigError(f"--node-api-key-env names {self.node_api_key_env}, which is empty or unset")
        return value


@dataclass(frozen=True)
class Caller:
    """Who is asking: the tenant name nodes partition caches by, and its limit."""

    tenant: str | None
    requests_per_minute: int


class ApiKeys:
    """The callers the gateway admits: a keys file of sha256 hashes, or anyone (no file).

    Without a file every bearer token is its own tenant (named by a prefix of its hash) and a
    request without one is anonymous (no cache partition of its own); all get the default limit.
    """

    def __init__(self, default_rpm: int, path: Path | None = None) -> None:
        self.default_rpm = default_rpm
        self.open = path is None
        self._by_hash: dict[str, Caller] = {}
        if path is not None:
            try:
                entries = json.loads(path.read_text())["keys"]
                for entry in entries:
                    digest = str(entry["sha256"]).lower()
                    name = str(entry["name"])
                    self._by_hash[digest] = Caller(name, int(entry.get("requests_per_minute", default_rpm)))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"--keys {path}: not a keys file ({type(exc).__name__}: {exc})") from None

    def caller(self, authorization: bytes | None) -> Caller | None:
        """The caller of a request, or None when it must be refused (401)."""
        scheme, _, token = (authorization or b"").partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return Caller(None, self.default_rpm) if self.open else None
        digest = hashlib.sha256(token).hexdigest()
        if self.open:
            return Caller(f"key-{digest[:32]}", self.default_rpm)
        return self._by_hash.get(digest)
