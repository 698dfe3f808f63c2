"""The configuration travels to vLLM's API processes as environment variables: it must survive."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tee_inference.config import ENV_PREFIX, ServerConfig
from tee_inference.exceptions import ConfigError

# Values as an operator could set them: names without the list separator, paths without NULs.
_names = st.text(st.characters(blacklist_characters=",\x00", blacklist_categories=("Cs",)), min_size=1)
_paths = st.builds(
    Path, st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1)
)
_hex32 = st.binary(min_size=32, max_size=32).map(bytes.hex)


@st.composite
def configs(draw: st.DrawFn) -> ServerConfig:
    tee = draw(st.sampled_from(["simulated", "tdx"]))
    key_source = draw(st.sampled_from(["random", "dstack"] + (["file"] if tee == "simulated" else [])))
    tls = draw(st.sampled_from(["self-signed", "files", "dstack", "off"]))
    tls_cert = draw(_paths) if tls == "files" and tee == "simulated" else draw(st.none() | _paths)
    return ServerConfig.build(
        tee=tee,
        tls=tls,
        tls_names=draw(st.none() | st.lists(_names, max_size=3).map(tuple)),
        tls_cert=tls_cert,
        tls_key=draw(st.none() | _paths) if tls == "files" and tee == "simulated" else None,
        tls_dir=draw(st.none() | _paths),
        insecure_plaintext=True if (tee == "tdx" and tls == "off") else draw(st.none() | st.booleans()),
        key_source=key_source,
        key_file=draw(_paths) if key_source == "file" else draw(st.none() | _paths),
        key_epoch=draw(st.integers(0, 2**31)),
        tdx_provider=draw(st.sampled_from(["configfs", "dstack", "dstack-native"])),
        dstack_socket=draw(st.none() | _paths),
        dstack_key_path=draw(st.none() | _names),
        api_key_env=draw(st.none() | st.from_regex(r"[A-Z_][A-Z0-9_]{0,20}", fullmatch=True)),
        served_models=draw(st.none() | st.lists(_names, max_size=3).map(tuple)),
        model_dir=draw(st.none() | _paths),
        model_weights_root=draw(st.none() | _hex32),
        image_digest=draw(st.none() | _hex32.map(lambda h: f"sha256:{h}")),
        report_cache_ttl_s=draw(st.none() | st.floats(0, 600)),
        signature_ttl_s=draw(st.none() | st.floats(1800, 1e9)),
        signature_max_entries=draw(st.none() | st.integers(1, 2**40)),
        max_request_bytes=draw(st.none() | st.integers(1, 2**40)),
    )


@given(configs())
def test_from_env_inverts_to_env(config: ServerConfig) -> None:
    env = config.to_env()
    assert all(name.startswith(ENV_PREFIX) for name in env)
    assert ServerConfig.from_env(env) == config


def test_from_env_names_the_bad_setting() -> None:
    with pytest.raises(ConfigError, match="key_epoch"):
        ServerConfig.from_env({f"{ENV_PREFIX}KEY_EPOCH": "minus one"})
    with pytest.raises(ConfigError, match="key_file"):
        ServerConfig.from_env({f"{ENV_PREFIX}KEY_SOURCE": "file"})
