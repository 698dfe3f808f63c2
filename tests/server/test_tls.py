"""TLS that ends inside the serving process, bound to the quote, and the verifying client over it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fakes.dstack import serve_fake_dstack
from support.relay import tcp_relay, tls_terminating_relay
from support.servers import running
from support.simulated_report import simulated_server_expectations
from tee_inference.asgi import ASGIApp, Message, Receive, Scope, Send
from tee_inference.attestation.eventlog import EVENT_KEYSET, load_event_log
from tee_inference.attestation.tdx_quote import parse_quote
from tee_inference.boot import boot
from tee_inference.client import AsyncAttestedClient, AttestationError, AttestedClient, SignatureMismatchError
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.exceptions import ConfigError, TrustRootError
from tee_inference.middleware import SigningMiddleware
from tee_inference.services import Services
from tee_inference.tls import (
    KeyFiles,
    TlsIdentity,
    certificate_request,
    filesystem_type,
    self_signed_certificate,
)
from tee_inference.verify import VerificationPolicy, Verifier, parse_expected_measurements
from tee_inference.verify.e2e import verify_url
from tee_inference.verify.tlspin import spki_sha256_of_der

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


def _expected(tmp_path: Path) -> Path:
    path = tmp_path / "expected.json"
    path.write_text(json.dumps(simulated_server_expectations({MODEL: FakeEngine.weights_root()})))
    return path


def _policy(tmp_path: Path) -> VerificationPolicy:
    expected = parse_expected_measurements(_expected(tmp_path).read_text())
    return VerificationPolicy.build(expected=[expected], allow_simulated=True)


@dataclass
class TlsServer:
    url: str
    port: int
    services: Services


@contextmanager
def _serve(
    config: ServerConfig, app_wrapper: Any = None, engine: ASGIApp | None = None
) -> Iterator[TlsServer]:
    services = boot(config)
    tls = services.keys.tls
    assert tls is not None
    tls.write_files(None, require_ram=False)
    app: ASGIApp = SigningMiddleware(engine or FakeEngine(MODEL), services=services)
    if app_wrapper is not None:
        app = app_wrapper(app)
    try:
        with running(app, ssl_context=tls.serve_context()) as url:
            yield TlsServer(url, int(url.rsplit(":", 1)[1]), services)
    finally:
        tls.close()


def _config(**extra: Any) -> ServerConfig:
    values: dict[str, Any] = {"tls": "self-signed", **extra}
    return ServerConfig.build(served_models=(MODEL,), model_weights_root=FakeEngine.weights_root(), **values)


@pytest.fixture(scope="module")
def server() -> Iterator[TlsServer]:
    with _serve(_config()) as running_server:
        yield running_server


# -- primitives ------------------------------------------------------------------------------


def test_certificate_csr_and_spki() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed_certificate(key, ("llm.example", "10.0.0.7"))
    identity = TlsIdentity("self-signed", key, [cert])
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert identity.spki_sha256 == hashlib.sha256(der).digest()
    assert spki_sha256_of_der(cert.public_bytes(serialization.Encoding.DER)) == identity.spki_sha256
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["llm.example"]
    csr = x509.load_pem_x509_csr(certificate_request(key, ("llm.example",)))
    assert csr.is_signature_valid and csr.public_key() == key.public_key()
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConfigError, match="not this server's TLS key"):
        identity.install_chain(self_signed_certificate(other, ()).public_bytes(serialization.Encoding.PEM))


def test_key_files_are_private_and_on_a_ram_file_system(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    identity = TlsIdentity("self-signed", key, [self_signed_certificate(key, ())])
    if filesystem_type(Path("/dev/shm")) == "tmpfs":
        files = KeyFiles(identity)
        assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(files.key_path.stat().st_mode) == 0o600
        assert b"PRIVATE KEY" in files.key_path.read_bytes()
        files.close()
        assert not files.directory.exists()
    if filesystem_type(tmp_path) not in ("tmpfs", "ramfs"):
        with pytest.raises(TrustRootError, match="not tmpfs: the TLS key would reach a disk"):
            KeyFiles(identity, tmp_path)


def test_tdx_needs_tls_or_a_loud_option() -> None:
    with pytest.raises(ConfigError, match="needs --insecure-plaintext"):
        ServerConfig.build(tee="tdx", tls="off")
    assert ServerConfig.build(tee="tdx", tls="off", insecure_plaintext=True).tls == "off"
    with pytest.raises(ConfigError, match="made outside the CVM"):
        ServerConfig.build(tee="tdx", tls="files", tls_cert=Path("c"), tls_key=Path("k"))


# -- the server over TLS ---------------------------------------------------------------------


def _live_spki(port: int) -> bytes:
    der = ssl.get_server_certificate(("127.0.0.1", port)).encode()
    return spki_sha256_of_der(x509.load_pem_x509_certificate(der).public_bytes(serialization.Encoding.DER))


def test_report_binds_the_live_certificate_as_nearai_checks_it(server: TlsServer) -> None:
    nonce = os.urandom(32)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    report = httpx.get(
        f"{server.url}/v1/attestation/report",
        params={"nonce": nonce.hex(), "include_tls_fingerprint": "true"},
        verify=context,
    ).json()
    live = _live_spki(server.port)
    assert report["tls_cert_fingerprint"] == live.hex()
    # nearai's published check, re-done here independently of our verifier:
    # report_data[:32] == sha256(20 raw address bytes ‖ 32 raw SPKI-hash bytes), [32:] == nonce.
    report_data = parse_quote(bytes.fromhex(report["intel_quote"])).report_data
    address = bytes.fromhex(report["signing_address"][2:])
    assert report_data == hashlib.sha256(address + live).digest() + nonce
    # ...and the boot's keyset event (RTMR3) records the same key next to the signing keys.
    keyset = next(e for e in load_event_log(report["event_log"]) if e.event == EVENT_KEYSET)
    payload = json.loads(keyset.event_payload)
    assert payload["tls_spki_sha256"] == live.hex() and payload["address"] == report["signing_address"]
    assert len(bytes.fromhex(payload["e2ee_public_key"])) == 32
    # Without the flag: the SPEC §3 layout, the fingerprint still reported.
    plain = httpx.get(
        f"{server.url}/v1/attestation/report", params={"nonce": nonce.hex()}, verify=context
    ).json()
    assert parse_quote(bytes.fromhex(plain["intel_quote"])).report_data == address + bytes(12) + nonce


def test_old_tls_versions_are_refused(server: TlsServer) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    # Python itself discourages asking for these versions.
    with pytest.warns(DeprecationWarning, match="TLSv1_1 is deprecated"):
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.warns(DeprecationWarning, match="TLSv1 is deprecated"):
        context.minimum_version = ssl.TLSVersion.TLSv1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", verify=context)


def test_verify_url_pins_the_live_connection(server: TlsServer, tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    direct = verify_url(server.url, MODEL, policy, verifier=Verifier.production())
    assert direct.ok, direct.blocking
    assert "is the attested one; pinned" in direct.check("tls_binding").detail
    # A TCP relay (TLS still ends in the server) changes nothing.
    with tcp_relay(server.port) as port:
        relayed = verify_url(f"https://127.0.0.1:{port}", MODEL, policy, verifier=Verifier.production())
    assert relayed.ok, relayed.blocking
    # A relay that ends TLS itself presents its own key: caught, and no completion is sent to it.
    with tls_terminating_relay(server.port, str(tmp_path)) as port:
        intercepted = verify_url(f"https://127.0.0.1:{port}", MODEL, policy, verifier=Verifier.production())
    assert not intercepted.ok
    assert "a TLS-terminating relay" in intercepted.check("tls_binding").detail
    assert "completion" not in intercepted.names()
    # Plain http is refused before a byte is sent.
    refused = verify_url(server.url.replace("https", "http"), MODEL, policy, verifier=Verifier.production())
    assert [c.name for c in refused.checks] == ["tls_binding"]


def test_openai_sdk_through_the_verifying_client(server: TlsServer, tmp_path: Path) -> None:
    http = AttestedClient(server.url, model=MODEL, expect=_expected(tmp_path), allow_simulated=True)
    llm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", http_client=http)
    whole = llm.chat.completions.create(**CHAT)
    assert whole.choices[0].message.content
    chunks = list(llm.chat.completions.create(**CHAT, stream=True))
    assert chunks and chunks[0].id.startswith("chatcmpl-")
    completion = llm.completions.create(model=MODEL, prompt="once upon", max_tokens=5, stream=True)
    assert list(completion)
    assert http.attestation is not None and http.attestation.tls_spki_sha256 == _live_spki(server.port)
    http.close()


def test_async_openai_sdk_through_the_verifying_client(server: TlsServer, tmp_path: Path) -> None:
    async def go() -> tuple[str | None, int]:
        http = AsyncAttestedClient(server.url, model=MODEL, expect=_expected(tmp_path), allow_simulated=True)
        llm = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", http_client=http)
        whole = await llm.chat.completions.create(**CHAT)
        stream = await llm.chat.completions.create(**CHAT, stream=True)
        count = len([c async for c in stream])
        await http.aclose()
        return whole.choices[0].message.content, count

    content, count = anyio.run(go)
    assert content and count > 1


def test_concurrent_first_requests_attest_once(tmp_path: Path) -> None:
    reports: list[str] = []

    def counting(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] == "/v1/attestation/report":
                reports.append(scope["path"])
            await app(scope, receive, send)

        return wrapped

    async def go(url: str) -> int:
        http = AsyncAttestedClient(url, model=MODEL, expect=_expected(tmp_path), allow_simulated=True)
        assert http.attestation is None
        llm = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", http_client=http)
        answers = await asyncio.gather(*(llm.chat.completions.create(**CHAT) for _ in range(6)))
        assert http.attestation is not None
        await http.aclose()
        return len(answers)

    with _serve(_config(), app_wrapper=counting) as fresh:
        assert anyio.run(go, fresh.url) == 6
    assert len(reports) == 1


@pytest.mark.parametrize("encrypt", [False, True])
def test_an_answer_too_big_to_hold_is_checked_by_its_fetched_signature(tmp_path: Path, encrypt: bool) -> None:
    async def engine(scope: Any, receive: Any, send: Any) -> None:
        """vLLM's JSON answer (the id leads it), sent in 50-byte pieces."""
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await FakeEngine(MODEL)(scope, receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        answer = json.dumps({
            "id": f"chatcmpl-{os.urandom(16).hex()}", "object": "chat.completion", "created": 7,
            "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": "a long answer " * 20}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 40, "total_tokens": 43},
        }).encode()  # fmt: skip
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        for i in range(0, len(answer), 50):
            await send({"type": "http.response.body", "body": answer[i : i + 50], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    with _serve(_config(max_held_response_bytes=64), engine=engine) as small:
        # The server streams the answer on once past 64 bytes: no signature headers come with it.
        raw = httpx.post(f"{small.url}/v1/chat/completions", json=CHAT, verify=False)  # noqa: S501
        assert raw.status_code == 200 and "x-signature-text" not in raw.headers
        http = AttestedClient(small.url, model=MODEL, expect=_expected(tmp_path), allow_simulated=True,
                              encrypt=encrypt)  # fmt: skip
        llm = openai.OpenAI(base_url=f"{small.url}/v1", api_key="-", http_client=http, max_retries=0)
        assert llm.chat.completions.create(**CHAT).choices[0].message.content
        http.close()


def test_the_client_refuses_a_relay_and_unverified_servers(server: TlsServer, tmp_path: Path) -> None:
    with tls_terminating_relay(server.port, str(tmp_path)) as port:
        http = AttestedClient(
            f"https://127.0.0.1:{port}", model=MODEL, expect=_expected(tmp_path), allow_simulated=True
        )
        with pytest.raises(Exception, match="TLS-terminating relay"):
            http.post("/v1/chat/completions", json=CHAT)
        http.close()
    strict = AttestedClient(server.url, model=MODEL, expect=_expected(tmp_path))  # simulated not allowed
    with pytest.raises(AttestationError, match="simulated"):
        strict.post("/v1/chat/completions", json=CHAT)
    strict.close()


def _tamper(app: ASGIApp) -> ASGIApp:
    """A layer outside the signer that changes one byte of every completion body: what the
    verifying client must catch (the server signed other bytes than those received)."""

    async def tampering(scope: Scope, receive: Receive, send: Send) -> None:
        async def altered(message: Message) -> None:
            if message["type"] == "http.response.body" and b'"content":"' in message.get("body", b""):
                message = {**message, "body": message["body"].replace(b'"content":"', b'"content":"!', 1)}
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [(k, v) for k, v in message["headers"] if k != b"content-length"],
                }
            await send(message)

        await app(scope, receive, altered if scope["type"] == "http" else send)

    return tampering


def test_the_client_raises_on_altered_bytes(tmp_path: Path) -> None:
    with _serve(_config(), _tamper) as server:
        http = AttestedClient(server.url, model=MODEL, expect=_expected(tmp_path), allow_simulated=True)
        llm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", http_client=http, max_retries=0)
        with pytest.raises(SignatureMismatchError, match="hash to"):
            llm.chat.completions.create(**CHAT)
        with pytest.raises(SignatureMismatchError, match="hash to"):
            list(llm.chat.completions.create(**CHAT, stream=True))
        http.close()


# -- certificates from a CA for our own key ---------------------------------------------------


def _ca_sign(csr_pem: bytes, starts: timedelta = timedelta(minutes=-1), days: int = 90) -> bytes:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    csr = x509.load_pem_x509_csr(csr_pem)
    begins = datetime.now(UTC) + starts
    leaf = (
        x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_name).public_key(csr.public_key())
        .serial_number(7).not_valid_before(begins).not_valid_after(begins + timedelta(days=days))
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    return leaf.public_bytes(serialization.Encoding.PEM)


def test_files_mode_installs_a_ca_certificate_for_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with _serve(_config(tls="files", tls_names=("llm.example",))) as open_server:
        csr = httpx.get(f"{open_server.url}/v1/tls/csr", verify=context)
        chain = _ca_sign(csr.content)
        anyone = httpx.post(f"{open_server.url}/v1/tls/certificate", content=chain, verify=context)
        assert anyone.status_code == 403 and "API token" in anyone.json()["error"]["message"]
    monkeypatch.setenv("TEST_TLS_TOKEN", "s3cret")
    config = _config(tls="files", tls_names=("llm.example",), api_key_env="TEST_TLS_TOKEN")
    with _serve(config) as server:
        auth = {"authorization": "Bearer s3cret"}
        before = _live_spki(server.port)
        csr = httpx.get(f"{server.url}/v1/tls/csr", verify=context, headers=auth)
        assert csr.status_code == 200 and csr.content.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
        chain = _ca_sign(csr.content)
        unauthenticated = httpx.post(f"{server.url}/v1/tls/certificate", content=chain, verify=context)
        assert unauthenticated.status_code == 401
        for stale in (_ca_sign(csr.content, timedelta(days=-100)), _ca_sign(csr.content, timedelta(days=2))):
            refused = httpx.post(
                f"{server.url}/v1/tls/certificate", content=stale, verify=context, headers=auth
            )
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "certificate_refused"
            assert "expired" in refused.text or "not valid before" in refused.text
        installed = httpx.post(
            f"{server.url}/v1/tls/certificate", content=chain, verify=context, headers=auth
        )
        assert installed.json() == {"installed": True, "tls_cert_fingerprint": before.hex()}
        pem = ssl.get_server_certificate(("127.0.0.1", server.port))
        assert x509.load_pem_x509_certificate(pem.encode()).issuer.rfc4514_string() == "CN=test CA"
        assert _live_spki(server.port) == before  # the key never moved, so the binding holds
        foreign = self_signed_certificate(ec.generate_private_key(ec.SECP256R1()), ())
        refused = httpx.post(
            f"{server.url}/v1/tls/certificate",
            content=foreign.public_bytes(serialization.Encoding.PEM),
            verify=context,
            headers=auth,
        )
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "certificate_refused"
        verified = verify_url(
            server.url, MODEL, _policy(tmp_path), verifier=Verifier.production(), api_key="s3cret"
        )
        assert verified.ok


def test_files_mode_watches_the_certificate_file(tmp_path: Path) -> None:
    from tee_inference.tls import CertificateWatcher

    cert_path = tmp_path / "chain.pem"
    with _serve(_config(tls="files", tls_cert=cert_path)) as server:
        tls = server.services.keys.tls
        assert tls is not None and tls.csr_pem is not None
        watcher = CertificateWatcher(tls, cert_path, interval_s=3600)
        assert watcher.check_once() is False  # nothing there yet: the self-signed certificate serves
        cert_path.write_bytes(_ca_sign(tls.csr_pem))
        assert watcher.check_once() is True
        pem = ssl.get_server_certificate(("127.0.0.1", server.port))
        assert x509.load_pem_x509_certificate(pem.encode()).issuer.rfc4514_string() == "CN=test CA"
        time.sleep(0.01)
        cert_path.write_bytes(b"garbage")
        assert watcher.check_once() is False  # refused and logged; the installed chain stays


def test_dstack_mode_takes_key_and_chain_from_the_agent(tmp_path: Path) -> None:
    socket_path = Path(f"/tmp/tls-dstack-{os.getpid()}.sock")
    with serve_fake_dstack(socket_path) as agent:
        services = boot(_config(tls="dstack", dstack_socket=socket_path, tls_names=("llm.example",)))
        tls = services.keys.tls
        assert tls is not None and tls.mode == "dstack"
        assert tls.chain[1].subject.rfc4514_string() == "CN=fake dstack app CA"
        assert ("/GetTlsKey", {"subject": "llm.example", "alt_names": ["llm.example"], "usage_server_auth": True,
                               "usage_client_auth": False, "usage_ra_tls": False}) in agent.requests  # fmt: skip
