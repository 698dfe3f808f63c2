"""Signing primitives: the SPEC §2 seed vector, eth-account equivalence, ed25519, key derivation."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from tee_inference.exceptions import KeySourceError
from tee_inference.keys import FileKeySource, derive_signer
from tee_inference.signing import (
    EcdsaSigner,
    Ed25519Signer,
    ecdsa_signature_matches,
    ed25519_signature_matches,
    recover_ecdsa_address,
    sha256_hex,
    signature_text,
)

SEED_TEXT = (
    "e5542b0757e0b9d05bfa4a15da7bac97a03bd35d21b648ec492152708e795ff9:"
    "7a97926adb2044fd598b392eee98ad8f7c39ea3a47747ca968ef755bbf57c211"
)
SEED_SIGNATURE = bytes.fromhex(
    "faf0316a4860fd3d412cb5851b55687edc31f5600b4667502cf32112e1ad533b"
    "5d6420beb1fd7002334a46d897e11347837675bc01982485e00549091b06f8a81b"
)
SEED_ADDRESS = "0xD8414F83c1335627b31d08Eba6d2dA5Fa53A0A83"


def test_seed_vector_recovers_with_our_code_and_eth_account() -> None:
    assert recover_ecdsa_address(SEED_TEXT, SEED_SIGNATURE) == SEED_ADDRESS
    reference = Account.recover_message(encode_defunct(text=SEED_TEXT), signature=SEED_SIGNATURE)
    assert reference == SEED_ADDRESS
    assert ecdsa_signature_matches(SEED_TEXT, SEED_SIGNATURE, SEED_ADDRESS.lower())


def test_seed_vector_tampered_does_not_recover_to_the_address() -> None:
    flipped = bytearray(SEED_SIGNATURE)
    flipped[10] ^= 1
    assert not ecdsa_signature_matches(SEED_TEXT, bytes(flipped), SEED_ADDRESS)
    assert not ecdsa_signature_matches(SEED_TEXT.replace("e", "f", 1), SEED_SIGNATURE, SEED_ADDRESS)


@pytest.mark.parametrize("trial", range(40))
def test_coincurve_signature_is_byte_identical_to_eth_account(trial: int) -> None:
    key = secrets.token_bytes(32)
    text = signature_text(sha256_hex(secrets.token_bytes(trial)), sha256_hex(secrets.token_bytes(7)))
    if trial % 5 == 0:
        text = "non-hex text é 漢字 " * trial  # any UTF-8 text, any length prefix
    ours = EcdsaSigner(key)
    reference = Account.from_key(key)
    assert ours.address == reference.address
    expected = reference.sign_message(encode_defunct(text=text)).signature
    assert ours.sign(text) == bytes(expected)


def test_ecdsa_signature_shape() -> None:
    signature = EcdsaSigner(secrets.token_bytes(32)).sign("x")
    assert len(signature) == 65 and signature[64] in (27, 28)
    with pytest.raises(ValueError, match="65 bytes"):
        recover_ecdsa_address("x", signature[:64])


def test_invalid_secp256k1_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        EcdsaSigner(b"\0" * 32)
    with pytest.raises(ValueError):
        EcdsaSigner(b"\xff" * 32)


def test_ed25519_rfc8032_vector_1() -> None:
    # RFC 8032 §7.1, TEST 1: empty message.
    secret = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    signer = Ed25519Signer(secret)
    assert signer.public_key.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert signer.sign("").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


def test_ed25519_verifies_and_rejects_tamper() -> None:
    signer = Ed25519Signer(secrets.token_bytes(32))
    signature = signer.sign(SEED_TEXT)
    assert ed25519_signature_matches(SEED_TEXT, signature, signer.public_key)
    assert not ed25519_signature_matches(SEED_TEXT + "0", signature, signer.public_key)
    assert not ed25519_signature_matches(
        SEED_TEXT, signature[:-1] + bytes([signature[-1] ^ 1]), signer.public_key
    )


def test_derivation_is_deterministic_per_secret_and_epoch() -> None:
    secret = secrets.token_bytes(32)
    a, b = derive_signer(secret, 1), derive_signer(secret, 1)
    assert a.ecdsa.address == b.ecdsa.address and a.ed25519.public_key == b.ed25519.public_key
    c = derive_signer(secret, 2)
    assert c.ecdsa.address != a.ecdsa.address and c.ed25519.public_key != a.ed25519.public_key
    assert derive_signer(secrets.token_bytes(32), 1).ecdsa.address != a.ecdsa.address


def test_completion_signer_signs_both_algorithms() -> None:
    signer = derive_signer(secrets.token_bytes(32), 1)
    signed = signer.sign("a" * 64, "b" * 64)
    assert signed.text == "a" * 64 + ":" + "b" * 64
    assert recover_ecdsa_address(signed.text, signed.ecdsa) == signer.ecdsa.address
    assert ed25519_signature_matches(signed.text, signed.ed25519, signed.ed25519_public_key)


def test_private_key_never_in_repr() -> None:
    key = secrets.token_bytes(32)
    signer = derive_signer(key, 1)
    text = repr(signer) + repr(signer.ecdsa) + repr(signer.ed25519)
    assert key.hex() not in text and "PrivateKey" not in text


def test_file_key_source(tmp_path) -> None:
    source = FileKeySource.create(tmp_path / "key")
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    assert (
        derive_signer(source.root_secret(), 1).ecdsa.address
        == derive_signer(source.root_secret(), 1).ecdsa.address
    )
    (tmp_path / "bad").write_text("zz")
    with pytest.raises(KeySourceError, match="64 hex"):
        FileKeySource(tmp_path / "bad").root_secret()
    with pytest.raises(KeySourceError, match="cannot read"):
        FileKeySource(tmp_path / "missing").root_secret()


def test_keys_command_shows_public_material_only(tmp_path) -> None:
    import json
    import subprocess
    import sys

    key = tmp_path / "key"
    secret = "ab" * 32
    key.write_text(secret)
    run = [
        sys.executable,
        "-m",
        "tee_inference",
        "keys",
        "--key-source",
        "file",
        "--key-file",
        str(key),
        "--json",
    ]
    first = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert json.loads(first)["signing_address"] == derive_signer(bytes.fromhex(secret), 1).ecdsa.address
    assert secret not in first
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout == first
