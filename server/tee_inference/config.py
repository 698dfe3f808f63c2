"""The server's configuration: one typed object, read once at start.

It travels as `TEE_INFERENCE_*` environment variables because vLLM instantiates our
middleware without arguments (`vllm serve --middleware …`). Secrets never travel this
way: the bearer token is named by the variable that holds it (`--api-key-env`), and the
signing key is made inside the serving process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from tee_inference.exceptions import ConfigError

ENV_PREFIX = "TEE_INFERENCE_"
# The dstack KMS path the signing key's root secret is asked under: part of the key's identity,
# so it has exactly one default.
DSTACK_KEY_PATH = "tee-inference/signing-key"


class ServerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tee: Literal["simulated", "tdx"] = "simulated"
    key_source: Literal["random", "file", "dstack"] = "random"
    key_file: Path | None = None
    key_epoch: int = Field(default=1, ge=0)
    # With tee=tdx: quotes from the kernel's configfs-tsm, or from the dstack guest agent.
    tdx_provider: Literal["configfs", "dstack", "dstack-native"] = "configfs"
    dstack_socket: Path = Path("/var/run/dstack.sock")
    dstack_key_path: str = DSTACK_KEY_PATH
    # Name of the environment variable that holds the bearer token; None = no auth.
    api_key_env: str | None = None
    # Served model names that pass the gate. Empty: ask the engine's /v1/models once.
    served_models: tuple[str, ...] = ()
    model_dir: Path | None = None
    # Attest the GPUs (and NVSwitches) locally at boot and only then set their CC ready state.
    gpu_ready_gate: bool = False
    # Expected model-weights root; the start is refused when the measured one differs.
    model_weights_root: str | None = None
    # The container image this runs in, as the image build recorded it (reported and measured).
    image_digest: str | None = None
    # TLS inside the serving process (tls.py): self-signed, files (CA-issued for our CSR), dstack, off.
    tls: Literal["self-signed", "files", "dstack", "off"] = "off"
    tls_names: tuple[str, ...] = ()  # DNS names / IPs for the certificate and CSR
    tls_cert: Path | None = None  # files: the CA-issued chain, watched and reloaded
    tls_key: Path | None = None  # files: a key made OUTSIDE the CVM; development only
    tls_dir: Path | None = None  # where the key files go (a tmpfs); default $XDG_RUNTIME_DIR or /dev/shm
    # --tee tdx with --tls off: prompts would cross the host in clear; only when asked loudly.
    insecure_plaintext: bool = False
    # With tee=simulated: the app-compose file the simulated dstack platform launched (measured
    # into MRCONFIGID and RTMR3 as dstack does); None = a built-in placeholder.
    simulated_compose: Path | None = None
    report_cache_ttl_s: float = Field(default=30.0, ge=0.0, le=600.0)
    signature_ttl_s: float = Field(default=3600.0, ge=1800.0)
    signature_max_entries: int = Field(default=1_000_000, gt=0)
    signature_max_bytes: int = Field(default=512 << 20, gt=0)
    max_request_bytes: int = Field(default=16 << 20, gt=0)
    # A non-streaming body is held until it ends so its signature can go in the headers;
    # past this size it is forwarded as it comes (still signed and stored, no headers).
    max_held_response_bytes: int = Field(default=32 << 20, gt=0)
    # Everything a client can make the server hold or wait for is bounded (docs/api.md, "Limits").
    # Request-body bytes held across all connections at once; past it: 429 `server_busy`.
    max_inflight_request_bytes: int = Field(default=256 << 20, gt=0)
    # From the request's headers to the last body byte; past it: 408 and the connection closes.
    body_timeout_s: float = Field(default=30.0, gt=0)
    # Completions in flight, and the engine's recent time to first token; past either: 429.
    max_inflight_completions: int = Field(default=512, gt=0)
    max_ttft_s: float | None = Field(default=None, gt=0)
    # What the signing layer waits for the engine: its model list, health, version and metrics,
    # and (proxy) the response headers of a completion (vLLM sends a whole body's only at its end).
    engine_timeout_s: float = Field(default=10.0, gt=0)
    engine_response_timeout_s: float = Field(default=900.0, gt=0)
    # The transport (tee-inference's own uvicorn; vLLM's in-process server has its own settings).
    max_connections: int = Field(default=4096, gt=0)
    headers_timeout_s: float = Field(default=10.0, gt=0)
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    max_header_bytes: int = Field(default=32 << 10, ge=1024)
    # Collecting one attestation report (quote, GPU evidence); past it: 503, completions go on.
    report_timeout_s: float = Field(default=20.0, gt=0)
    # Scale-out (docs/scale-out.md). vLLM API processes of this node (`--api-server-count`): past
    # one, they share the launcher's store (`node_store`, the abstract socket the launcher names).
    api_server_count: int = Field(default=1, ge=1, le=64)
    node_store: str | None = None
    # A shared signature and usage store (any process, node or gateway replica answers any id).
    redis_url: str | None = None
    # Per-tenant prefix-cache partitions: a tenant the gateway names gets its own `cache_salt`.
    cache_isolation: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        if self.key_source == "file" and self.key_file is None:
            raise ValueError("key_source 'file' needs key_file")
        if self.tee == "tdx" and self.key_source == "file":
            raise ValueError("a key from a file is for development only and is refused with --tee tdx")
        if self.tee == "tdx" and self.tls == "off" and not self.insecure_plaintext:
            raise ValueError(
                "--tee tdx serves TLS from inside the CVM; --tls off would send every prompt across the "
                "host in clear and needs --insecure-plaintext"
            )
        if self.tls_key is not None and (self.tls != "files" or self.tls_cert is None):
            raise ValueError("--tls-key goes with --tls files and --tls-cert")
        if self.tls_key is not None and self.tee == "tdx":
            raise ValueError("a TLS key from a file was made outside the CVM and is refused with --tee tdx")
        if self.tee == "tdx" and self.simulated_compose is not None:
            raise ValueError("--simulated-compose is for --tee simulated; on dstack the platform measures it")
        return self

    def api_key(self, environ: Mapping[str, str] | None = None) -> SecretStr | None:
        """The bearer token, read from the variable named by `api_key_env`."""
        if self.api_key_env is None:
            return None
        value = (os.environ if environ is None else environ).get(self.api_key_env, "")
        if not value:
            raise ConfigError(f"--api-key-env names {self.api_key_env}, which is empty or unset")
        return SecretStr(value)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerConfig:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            if field.annotation == tuple[str, ...]:
                values[name] = tuple(part for part in raw.split(",") if part)
            else:
                values[name] = raw
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @classmethod
    def build(cls, **values: object) -> ServerConfig:
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces this configuration in a child process."""
        out: dict[str, str] = {}
        for name, value in self.model_dump(exclude_defaults=True).items():
            if isinstance(value, tuple):
                value = ",".join(value)
            out[ENV_PREFIX + name.upper()] = str(value)
        return out


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "configuration"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
