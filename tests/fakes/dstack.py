"""A fake dstack guest agent: a real HTTP/1.1 server (uvicorn) on a Unix socket, same protocol.

Routes and fields follow Dstack-TEE/dstack guest-agent/rpc/proto/agent_rpc.proto and
sdk/curl/api.md: POST ``/GetQuote``, ``/GetKey``, ``/GetTlsKey``, ``/Info``, ``/EmitEvent`` (and the legacy
``/prpc/Tappd.TdxQuote``, ``/prpc/Tappd.DeriveK256Key``, ``/prpc/Tappd.Info``), JSON bodies with
bytes as hex. Behind it, a simulated machine: SimulatedQuoteSigner quotes whose RTMRs are the
replay of its event log, and EmitEvent extends its RTMR3 with dstack's digest convention.
``fail_next`` makes the next request answer with a given status and raw body.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fakes.tdx_guest import FakeTdxGuestDevice
from support.servers import running
from tee_inference.attestation.eventlog import EventLog
from tee_inference.attestation.simulated_platform import simulated_boot_events
from tee_inference.attestation.tdx_simulated import SimulatedQuoteSigner

FAKE_MRTD = hashlib.sha384(b"fake dstack MRTD").digest()


class FakeDstackAgent:
    """``emit_event=False``: a release without EmitEvent (dstack 10898e63), which answers 404 there.
    ``device``: the machine's TDX guest device, whose RTMR3 extensions the quotes include (after
    the agent's own events, which all come before system-ready)."""

    def __init__(
        self, seed: bytes = bytes(32), *, emit_event: bool = True, device: FakeTdxGuestDevice | None = None
    ) -> None:
        self.seed = seed
        self.device = device
        self.signer = SimulatedQuoteSigner(seed)
        self.log = EventLog(simulated_boot_events(seed))
        for name, payload in (("system-preparing", b""), ("app-id", bytes(20)), ("system-ready", b"")):
            self.log.append_runtime_event(name, payload)
        self.fail_next: tuple[int, bytes] | None = None
        self.app_ca_key = ec.generate_private_key(ec.SECP256R1())
        self.app_ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake dstack app CA")])
        now = datetime.now(UTC)
        self.app_ca_pem = (
            x509.CertificateBuilder()
            .subject_name(self.app_ca_name)
            .issuer_name(self.app_ca_name)
            .public_key(self.app_ca_key.public_key())
            .serial_number(1)
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.app_ca_key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.app = Starlette(
            routes=[
                Route("/GetQuote", self._get_quote, methods=["POST"]),
                Route("/GetKey", self._get_key, methods=["POST"]),
                Route("/GetTlsKey", self._get_tls_key, methods=["POST"]),
                Route("/Info", self._info, methods=["POST", "GET"]),
                *([Route("/EmitEvent", self._emit_event, methods=["POST"])] if emit_event else []),
                Route("/prpc/Tappd.TdxQuote", self._tappd_quote, methods=["POST"]),
                Route("/prpc/Tappd.DeriveK256Key", self._tappd_key, methods=["POST"]),
                Route("/prpc/Tappd.Info", self._info, methods=["POST"]),
            ]
        )

    def key_for(self, path: str, purpose: str) -> bytes:
        return hmac.new(self.seed, f"{path}\0{purpose}".encode(), hashlib.sha256).digest()

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        self.requests.append((request.url.path, body))
        if self.fail_next is not None:
            status, content = self.fail_next
            self.fail_next = None
            return Response(content, status_code=status, media_type="application/json")
        return body

    def _quote(self, report_data_hex: str) -> dict[str, Any]:
        report_data = bytes.fromhex(report_data_hex).ljust(64, b"\0")  # "padding with 0s" (api.md)
        events = self.log.events
        rtmrs = list(EventLog(events).rtmrs())
        for _, index, digest in self.device.extends if self.device is not None else ():
            rtmrs[index] = hashlib.sha384(rtmrs[index] + digest).digest()  # native extensions
        quote = self.signer.quote(report_data, mrtd=FAKE_MRTD, rtmrs=rtmrs)
        return {
            "quote": quote.hex(),
            "event_log": json.dumps([e.to_dict() for e in events]),
            "report_data": report_data.hex(),
            "vm_config": "{}",
        }

    async def _get_quote(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        if len(body.get("report_data", "")) > 128:
            return JSONResponse({"error": "report_data must be at most 64 bytes"}, status_code=400)
        return JSONResponse(self._quote(body.get("report_data", "")))

    async def _tappd_quote(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        if body.get("hash_algorithm") != "raw":
            return JSONResponse({"error": "this fake only implements hash_algorithm raw"}, status_code=400)
        reply = self._quote(body["report_data"])
        return JSONResponse(
            {"quote": reply["quote"], "event_log": reply["event_log"], "hash_algorithm": "raw"}
        )

    async def _get_key(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        key = self.key_for(body.get("path", ""), body.get("purpose", ""))
        return JSONResponse(
            {"key": key.hex(), "signature_chain": [hashlib.sha256(key).hexdigest(), "00" * 65]}
        )

    async def _get_tls_key(self, request: Request) -> Response:
        """A fresh P-256 key per call, certified by the app CA (as the agent does)."""
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        key = ec.generate_private_key(ec.SECP256R1())
        names = [str(n) for n in body.get("alt_names", [])]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(body.get("subject") or "app"))])
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.app_ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=365))
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False
            )
        leaf = builder.sign(self.app_ca_key, hashes.SHA256())
        pem = serialization.Encoding.PEM
        key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return JSONResponse(
            {"key": key_pem.decode(), "certificate_chain": [leaf.public_bytes(pem).decode(), self.app_ca_pem]}
        )

    async def _tappd_key(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        key = self.key_for(body.get("path", ""), body.get("purpose", ""))
        return JSONResponse({"k256_key": key.hex(), "k256_signature_chain": ["00" * 65]})

    async def _info(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        rtmrs = self.log.rtmrs()
        tcb_info = {
            "mrtd": FAKE_MRTD.hex(),
            **{f"rtmr{i}": rtmrs[i].hex() for i in range(4)},
            "event_log": self.log.to_list(),
        }
        return JSONResponse(
            {
                "app_id": "00" * 20,
                "instance_id": "11" * 20,
                "app_cert": "",
                "tcb_info": json.dumps(tcb_info),
                "app_name": "fake",
                "device_id": "22" * 32,
                "os_image_hash": "33" * 32,
                "key_provider_info": '{"name":"fake"}',
                "compose_hash": "44" * 32,
                "vm_config": "{}",
            }
        )

    async def _emit_event(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        if not body.get("event"):
            return JSONResponse({"error": "event name is empty"}, status_code=400)
        self.log.append_runtime_event(body["event"], bytes.fromhex(body.get("payload", "")))
        return Response(b"", status_code=200)


@contextmanager
def serve_fake_dstack(socket_path: Path, agent: FakeDstackAgent | None = None) -> Iterator[FakeDstackAgent]:
    """Run the fake agent on ``socket_path`` in a thread for the duration of the block."""
    agent = agent or FakeDstackAgent()
    with running(agent.app, uds=socket_path, lifespan="off"):
        yield agent
