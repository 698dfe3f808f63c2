"""The dstack guest agent: quotes, the event log, RTMR3 events and the CVM's key, over its socket.

Protocol, as read from Dstack-TEE/dstack (public source):

- guest-agent/rpc/proto/agent_rpc.proto: service ``DstackGuest`` with ``GetQuote(RawQuoteArgs
  {report_data})`` → ``{quote, event_log (a JSON string), report_data}``, ``GetKey({path, purpose})``
  → ``{key, signature_chain}``, ``EmitEvent({event, payload})`` → empty, ``Info()`` → ``AppInfo``
  (``tcb_info`` a JSON string holding mrtd, rtmr0–3 and ``event_log``); the legacy ``Tappd``
  service has ``TdxQuote({report_data, hash_algorithm})``, ``DeriveK256Key`` and ``Info``.
- ``GetTlsKey({subject, alt_names, usage_ra_tls, usage_server_auth, usage_client_auth})`` →
  ``{key: PKCS#8 PEM, certificate_chain: [PEM, …]}``: a fresh random P-256 key per call, its
  certificate signed by the app's CA (agent_rpc.proto; guest-agent/src/rpc_service.rs).
- sdk/curl/api.md: HTTP/1.1 POST of a JSON body to ``/<Method>`` on ``/var/run/dstack.sock``;
  ``bytes`` fields travel as lowercase hex; GetQuote also returns ``vm_config``; errors are
  non-2xx with ``{"error": "..."}``; EmitEvent needs dstack OS 0.5.0 or later.
- sdk/python/src/dstack_sdk/dstack_client.py: ``DstackClient`` posts to ``/<Method>``; the
  deprecated ``TappdClient`` posts to ``/prpc/Tappd.<Method>`` on ``/var/run/tappd.sock`` and
  asks ``TdxQuote`` for ``hash_algorithm: "raw"`` so the 64 bytes are used as they are.

We speak the protocol directly with httpx rather than through ``dstack-sdk``: four calls do not
justify its dependency set (pydantic models, web3 extras), and the replies are parsed here into
our own ``Event`` type with errors that name the socket.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import httpx

from tee_inference.attestation.eventlog import Event, EventLogError, load_event_log, runtime_event
from tee_inference.attestation.tdx_quote import QuoteFormatError, parse_quote
from tee_inference.config import DSTACK_KEY_PATH
from tee_inference.exceptions import KeySourceError, TrustRootError
from tee_inference.tee import JsonState, StartCheck
from tee_inference.tee.tdx import NativeRtmr3
from tee_inference.tee.tdx_guest import TdxGuest

log = logging.getLogger(__name__)

DEFAULT_SOCKET: Final = Path("/var/run/dstack.sock")
LEGACY_TAPPD_SOCKET: Final = Path("/var/run/tappd.sock")
DEFAULT_KEY_PURPOSE: Final = "signing"
_ERROR_CLIP: Final = 200

Api = Literal["dstack", "tappd"]


class DstackError(TrustRootError):
    """The dstack guest agent failed or answered something we cannot use; names the socket."""


class DstackUnavailableError(DstackError):
    """No guest agent answers at the socket."""


class DstackKeyError(DstackError, KeySourceError):
    """GetKey failed. Both a trust-root and a key-source error; never carries key material."""


@dataclass(frozen=True)
class DstackQuote:
    quote: bytes
    event_log: list[Event]
    report_data: bytes | None = None
    vm_config: str | None = None


@dataclass(frozen=True)
class DstackKey:
    key: bytes = field(repr=False)
    signature_chain: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class DstackTlsKey:
    key_pem: bytes = field(repr=False)
    chain_pem: tuple[bytes, ...]


@dataclass(frozen=True)
class DstackInfo:
    app_id: str
    instance_id: str
    compose_hash: str
    os_image_hash: str
    key_provider_info: str
    tcb_info: dict[str, Any]
    event_log: list[Event]
    raw: dict[str, Any] = field(repr=False)


def _hex(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a hex string, got {type(value).__name__}")
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise ValueError(f"{name} is not valid hex") from None


def _object(obj: object, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_get_quote_response(obj: object) -> DstackQuote:
    """``{quote: hex, event_log: JSON string of events, report_data?: hex, vm_config?: str}``."""
    body = _object(obj, "GetQuote response")
    if "quote" not in body or "event_log" not in body:
        raise ValueError("GetQuote response lacks quote or event_log")
    try:
        events = load_event_log(body["event_log"])
    except EventLogError as exc:
        raise ValueError(f"GetQuote event_log: {exc}") from None
    report_data = body.get("report_data")
    vm_config = body.get("vm_config")
    return DstackQuote(
        quote=_hex(body["quote"], "quote"),
        event_log=events,
        report_data=_hex(report_data, "report_data") if report_data else None,
        vm_config=vm_config if isinstance(vm_config, str) else None,
    )


def parse_get_key_response(obj: object, api: Api = "dstack") -> DstackKey:
    """``{key: hex, signature_chain: [hex]}``; Tappd's DeriveK256Key names them ``k256_key``/``…_chain``."""
    body = _object(obj, "GetKey response")
    key_field, chain_field = (
        ("key", "signature_chain") if api == "dstack" else ("k256_key", "k256_signature_chain")
    )
    chain = body.get(chain_field, [])
    if not isinstance(chain, list):
        raise ValueError(f"GetKey {chain_field} must be a list")
    # Never put the value in the message: it is the key.
    try:
        key = bytes.fromhex(body[key_field])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"GetKey response has no hex {key_field!r}") from None
    return DstackKey(key=key, signature_chain=tuple(_hex(s, "signature_chain entry") for s in chain))


def parse_info_response(obj: object) -> DstackInfo:
    """Info's ``AppInfo``; ``tcb_info`` may be a JSON string (the agent) or an object (stored samples)."""
    body = _object(obj, "Info response")
    tcb = body.get("tcb_info", {})
    if isinstance(tcb, str):
        try:
            tcb = json.loads(tcb) if tcb else {}
        except ValueError:
            raise ValueError("Info tcb_info is not valid JSON") from None
    tcb = dict(_object(tcb, "Info tcb_info"))
    try:
        events = load_event_log(tcb.get("event_log", []))
    except EventLogError as exc:
        raise ValueError(f"Info tcb_info.event_log: {exc}") from None

    def text(name: str) -> str:
        value = body.get(name, "")
        return value if isinstance(value, str) else str(value)

    return DstackInfo(
        app_id=text("app_id"),
        instance_id=text("instance_id"),
        compose_hash=text("compose_hash"),
        os_image_hash=text("os_image_hash"),
        key_provider_info=text("key_provider_info"),
        tcb_info=tcb,
        event_log=events,
        raw=dict(body),
    )


class DstackClient:
    """HTTP/1.1 over the guest agent's Unix socket. Thread-safe (httpx's client is)."""

    def __init__(
        self,
        socket_path: Path = DEFAULT_SOCKET,
        *,
        api: Api | None = None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.api: Api = api or ("tappd" if self.socket_path.name == LEGACY_TAPPD_SOCKET.name else "dstack")
        self._client = httpx.Client(
            transport=transport or httpx.HTTPTransport(uds=str(self.socket_path)),
            base_url="http://dstack",  # the host is ignored on a Unix socket
            timeout=timeout_s,
        )

    def close(self) -> None:
        self._client.close()

    def _path(self, method: str) -> str:
        return f"/{method}" if self.api == "dstack" else f"/prpc/Tappd.{method}"

    def call(self, method: str, body: Mapping[str, Any], *, secret: bool = False) -> object:
        """POST one RPC; the decoded JSON reply. ``secret``: never echo the reply in an error."""
        where = f"dstack guest agent at {self.socket_path} ({self._path(method)})"
        try:
            response = self._client.post(self._path(method), json=dict(body))
        except httpx.TimeoutException:
            raise DstackError(f"{where}: no answer within {self._client.timeout.read} s") from None
        except httpx.TransportError as exc:
            raise DstackUnavailableError(
                f"dstack guest agent not reachable at {self.socket_path}: {_describe_transport(exc)}"
            ) from None
        if response.status_code // 100 != 2:
            raise DstackError(f"{where}: HTTP {response.status_code}: {_error_text(response, secret)}")
        if not response.content.strip():
            return {}  # EmitEvent answers 200 with an empty body
        try:
            reply: object = response.json()
        except ValueError:
            raise DstackError(f"{where}: reply is not valid JSON") from None
        if isinstance(reply, Mapping) and "error" in reply and len(reply) == 1:
            raise DstackError(f"{where}: {str(reply['error'])[:_ERROR_CLIP]}")
        return reply

    def get_quote(self, report_data: bytes) -> DstackQuote:
        if len(report_data) != 64:
            raise ValueError(f"report_data must be 64 bytes, got {len(report_data)}")
        if self.api == "dstack":
            reply = self.call("GetQuote", {"report_data": report_data.hex()})
        else:
            reply = self.call("TdxQuote", {"report_data": report_data.hex(), "hash_algorithm": "raw"})
        try:
            return parse_get_quote_response(reply)
        except ValueError as exc:
            raise DstackError(f"dstack guest agent at {self.socket_path}: GetQuote: {exc}") from None

    def get_key(self, path: str, purpose: str) -> DstackKey:
        method = "GetKey" if self.api == "dstack" else "DeriveK256Key"
        try:
            reply = self.call(method, {"path": path, "purpose": purpose}, secret=True)
            return parse_get_key_response(reply, self.api)
        except DstackError as exc:
            raise DstackKeyError(str(exc)) from None
        except ValueError as exc:
            raise DstackKeyError(f"dstack guest agent at {self.socket_path}: {method}: {exc}") from None

    def get_tls_key(self, subject: str, alt_names: tuple[str, ...]) -> DstackTlsKey:
        """A server TLS key and certificate chain from the agent (dstack only; never logged)."""
        if self.api != "dstack":
            raise DstackError(f"the legacy tappd agent at {self.socket_path} has no GetTlsKey")
        body = {"subject": subject, "alt_names": list(alt_names), "usage_server_auth": True,
                "usage_client_auth": False, "usage_ra_tls": False}  # fmt: skip
        reply = self.call("GetTlsKey", body, secret=True)
        try:
            obj = _object(reply, "GetTlsKey response")
            key, chain = obj["key"], obj["certificate_chain"]
            if not isinstance(key, str) or not isinstance(chain, list) or not chain:
                raise ValueError("GetTlsKey response needs a PEM key and a non-empty certificate_chain")
            return DstackTlsKey(key.encode(), tuple(str(c).encode() for c in chain))
        except (KeyError, ValueError) as exc:
            where = f"dstack guest agent at {self.socket_path}: GetTlsKey"
            raise DstackError(f"{where}: {exc if isinstance(exc, ValueError) else 'missing key'}") from None

    def info(self) -> DstackInfo:
        try:
            return parse_info_response(self.call("Info", {}))
        except ValueError as exc:
            raise DstackError(f"dstack guest agent at {self.socket_path}: Info: {exc}") from None

    def emit_event(self, name: str, payload: bytes) -> None:
        if self.api != "dstack":
            raise DstackError(
                f"the legacy tappd agent at {self.socket_path} has no EmitEvent (needs dstack OS 0.5.0+)"
            )
        if not name:
            raise ValueError("an event needs a name")
        self.call("EmitEvent", {"event": name, "payload": payload.hex()})


def _describe_transport(exc: httpx.TransportError) -> str:
    cause = exc.__cause__ or exc.__context__
    while cause is not None and not isinstance(cause, OSError) and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, FileNotFoundError):
        return "no such socket"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (the agent is not running)"
    if isinstance(cause, PermissionError):
        return "permission denied"
    return f"{type(exc).__name__}: {str(exc)[:_ERROR_CLIP]}"


def _error_text(response: httpx.Response, secret: bool) -> str:
    if secret:
        return response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        return response.text[:_ERROR_CLIP] or response.reason_phrase
    if isinstance(body, Mapping) and "error" in body:
        return str(body["error"])[:_ERROR_CLIP]
    return response.text[:_ERROR_CLIP]


def _client(client: DstackClient | Path | None) -> DstackClient:
    """A client given as itself, as a socket path, or by default (``/var/run/dstack.sock``)."""
    if isinstance(client, DstackClient):
        return client
    return DstackClient(client if client is not None else DEFAULT_SOCKET)


class DstackTdxProvider:
    """TdxProvider through the dstack guest agent: the agent owns the quote and the event log."""

    name = "dstack"
    simulated = False

    def __init__(self, client: DstackClient | Path | None = None) -> None:
        self.client = _client(client)

    def check(self) -> list[StartCheck]:
        """The agent answers Info (the caller takes the test quote: it costs seconds on hardware)."""
        try:
            info = self.client.info()
        except DstackError as exc:
            return [StartCheck("dstack guest agent", False, str(exc))]
        return [
            StartCheck("dstack guest agent", True, f"{self.client.socket_path}, app {info.app_id or '?'}")
        ]

    def get_quote(self, report_data: bytes) -> bytes:
        quote = self.client.get_quote(report_data).quote
        # The agent is outside our process: make sure it quoted what we asked for.
        try:
            got = parse_quote(quote).report_data
        except QuoteFormatError as exc:
            raise DstackError(f"dstack guest agent at {self.client.socket_path}: bad quote: {exc}") from None
        if got != report_data:
            raise DstackError(
                f"dstack guest agent at {self.client.socket_path}: quote report_data {got.hex()[:16]}… "
                f"is not the requested {report_data.hex()[:16]}…"
            )
        return quote

    def emit_event(self, name: str, payload: bytes) -> Event:
        self.client.emit_event(name, payload)
        # The agent extends RTMR3 with this digest and records the event in its own log.
        return runtime_event(name, payload)

    def state(self) -> JsonState:
        return {}  # the agent keeps the event log for every process

    def event_log(self) -> list[Event]:
        """The agent's log (it records our EmitEvent calls too), which replays to its quotes."""
        info = self.client.info()
        if info.event_log:
            return info.event_log
        return self.client.get_quote(bytes(64)).event_log


class DstackNativeEventsProvider(DstackTdxProvider):
    """dstack OS releases without the agent's EmitEvent (removed after v0.5.11, dstack 10898e63).

    The agent still quotes and keeps the platform's RTMR3 log (its events up to ``system-ready``);
    ours are extended through the TDX guest device, as dstack's notes on native TEE interfaces
    advise, and appended to the agent's log. The agent's log lists only the events it wrote, so
    the replay is the agent's events, then ours in the order they were extended: nothing else
    extends RTMR3 after ``system-ready`` on such releases. Needs ``/dev/tdx_guest`` (or the
    kernel's RTMR sysfs files) in the container besides the agent's socket.
    """

    name = "dstack-native"

    def __init__(
        self,
        client: DstackClient | Path | None = None,
        guest: TdxGuest | None = None,
        runtime_events: list[Event] | None = None,
    ) -> None:
        super().__init__(client)
        self._rtmr3 = NativeRtmr3(guest, runtime_events)

    def check(self) -> list[StartCheck]:
        return [*super().check(), *self._rtmr3.guest.check()]

    def emit_event(self, name: str, payload: bytes) -> Event:
        return self._rtmr3.emit_event(name, payload)

    def state(self) -> JsonState:
        return self._rtmr3.state()

    def event_log(self) -> list[Event]:
        return [*super().event_log(), *self._rtmr3.events()]


class DstackKeySource:
    """The signing key's root secret from dstack's GetKey: the same for the same app across boots."""

    name = "dstack"
    development_only = False

    def __init__(
        self,
        client: DstackClient | Path | None = None,
        key_path: str = DSTACK_KEY_PATH,
        purpose: str = DEFAULT_KEY_PURPOSE,
    ) -> None:
        self.client = _client(client)
        self.key_path = key_path
        self.purpose = purpose

    def root_secret(self) -> bytes:
        key = self.client.get_key(self.key_path, self.purpose).key
        if len(key) < 32:
            raise DstackKeyError(
                f"dstack guest agent at {self.client.socket_path}: GetKey({self.key_path!r}) gave "
                f"{len(key)} bytes, fewer than the 32 a root secret needs"
            )
        return key
