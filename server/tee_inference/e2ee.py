"""End-to-end encrypted bodies: Tinfoil's EHBP (HPKE, RFC 9180), to the key this boot attested.

For deployments where a gateway or load balancer outside the CVM must route without reading: the
client encrypts the request body to the X25519 key recorded in the boot's RTMR3 keyset event,
and the server encrypts every response byte back under keys bound to that request. The wire
format is EHBP's (a public specification: tinfoilsh/encrypted-http-body-protocol), so its clients
interoperate:

    suite      DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, base mode, empty AAD
    request    Ehbp-Encapsulated-Key: hex(enc)   with enc, ctx = SetupBaseS(pkR, "ehbp request")
               body = frame(ctx.Seal(chunk))…
    response   Ehbp-Response-Nonce: hex(n), n = 32 random bytes
               secret = ctx.Export("ehbp response", 32); prk = HKDF-Extract(enc ‖ n, secret)
               key = Expand(prk, "key", 32); base = Expand(prk, "nonce", 12)
               body = frame(AES-256-GCM(key, base XOR i, chunk_i))…   (i = 0, 1, …)
    frame      u32be(len(ciphertext)) ‖ ciphertext

Chunk order is authenticated (the nonce counts chunks); a dropped tail is not, by EHBP itself:
a completion stream ends with ``data: [DONE]`` inside the ciphertext and the signature covers
every ciphertext byte, so the verifying client detects truncation. HPKE base mode has no replay
protection; ``ReplayGuard`` refuses an encapsulated key it has already seen (bounded, per process).

Only the cryptography, framing, replay guard and key publication live here; the request path
applies them in ``exchange.SignedExchange``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections import OrderedDict
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey
from pyhpke.context_interface import ContextInterface

from tee_inference.asgi import Message, Send
from tee_inference.exceptions import FormatError

ENC_HEADER: Final = b"ehbp-encapsulated-key"
NONCE_HEADER: Final = b"ehbp-response-nonce"
KEYS_PATH: Final = "/.well-known/hpke-keys"
KEYS_MEDIA_TYPE: Final = b"application/ohttp-keys"
REQUEST_INFO: Final = b"ehbp request"
RESPONSE_LABEL: Final = b"ehbp response"
KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0002
ENC_SIZE, NONCE_SIZE, KEY_SIZE, AEAD_NONCE_SIZE = 32, 32, 32, 12
MAX_FRAME: Final = 1 << 24  # a frame larger than any body we accept is an attack, not data
_LEN: Final = struct.Struct(">I")


class E2eeError(FormatError):
    """An encrypted body cannot be used: bad key, framing or authentication (one generic message)."""


class E2eeRefusal(E2eeError):
    """An encrypted request refused, with the answer it gets (status, code, message)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code

    @classmethod
    def replayed(cls) -> E2eeRefusal:
        return cls(409, "e2ee_replay", "this encrypted request was already answered")


def _suite() -> CipherSuite:
    return CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)


def public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_config(public_key: bytes, key_id: int = 0) -> bytes:
    """The ``/.well-known/hpke-keys`` body: one RFC 9458 key config with our one suite.

    Served as EHBP's reference server serves it: the bare key config, without the two-byte
    length prefix RFC 9458 §3.2 puts before each config, because EHBP clients parse it that way.
    """
    return struct.pack(">BH", key_id, KEM_ID) + public_key + struct.pack(">HHH", 4, KDF_ID, AEAD_ID)


def parse_key_config(config: bytes) -> bytes:
    """The X25519 public key of a key config, which must be our suite."""
    if len(config) < 3 + ENC_SIZE + 6:
        raise E2eeError("the HPKE key configuration is truncated")
    _, kem = struct.unpack_from(">BH", config)
    suites = config[3 + ENC_SIZE :]
    if kem != KEM_ID or len(suites) < 6 or struct.unpack_from(">HHH", suites) != (4, KDF_ID, AEAD_ID):
        raise E2eeError("the HPKE key configuration is not X25519 / HKDF-SHA256 / AES-256-GCM")
    return config[3 : 3 + ENC_SIZE]


def frame(ciphertext: bytes) -> bytes:
    return _LEN.pack(len(ciphertext)) + ciphertext


class FrameReader:
    """Splits a byte stream into EHBP frames, however the transport cut it."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _LEN.size:
            (size,) = _LEN.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise E2eeError("an encrypted frame is larger than any body")
            if len(self._buffer) < _LEN.size + size:
                break
            frames.append(bytes(self._buffer[_LEN.size : _LEN.size + size]))
            del self._buffer[: _LEN.size + size]
        return [f for f in frames if f]  # zero-length frames are empty writes: ignored

    def finish(self) -> None:
        if self._buffer:
            raise E2eeError("the encrypted body ends inside a frame")


class _ResponseKeys:
    """AES-256-GCM with a per-chunk nonce (base XOR counter): EHBP's (and OHTTP's) response keys."""

    def __init__(self, context: ContextInterface, enc: bytes, response_nonce: bytes) -> None:
        secret = context.export(RESPONSE_LABEL, KEY_SIZE)
        prk = hmac.new(enc + response_nonce, secret, hashlib.sha256).digest()  # HKDF-Extract (RFC 5869)
        self._aead = AESGCM(HKDFExpand(hashes.SHA256(), KEY_SIZE, b"key").derive(prk))
        self._base = int.from_bytes(HKDFExpand(hashes.SHA256(), AEAD_NONCE_SIZE, b"nonce").derive(prk), "big")
        self._counter = 0

    def _nonce(self) -> bytes:
        nonce = (self._base ^ self._counter).to_bytes(AEAD_NONCE_SIZE, "big")
        self._counter += 1
        return nonce

    def seal(self, chunk: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(), chunk, None)

    def open(self, ciphertext: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(), ciphertext, None)
        except InvalidTag:
            raise E2eeError("an encrypted response chunk does not authenticate") from None


class ServerExchange:
    """The server's side of one encrypted exchange: open the request, seal the response."""

    def __init__(self, private_key: X25519PrivateKey, enc_hex: bytes) -> None:
        try:
            enc = bytes.fromhex(enc_hex.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            enc = b""
        if len(enc) != ENC_SIZE:
            raise E2eeError("Ehbp-Encapsulated-Key must be 64 hex characters (a 32-byte X25519 key)")
        self.enc = enc
        try:
            self._context = _suite().create_recipient_context(
                enc, KEMKey.from_pyca_cryptography_key(private_key), info=REQUEST_INFO
            )
        except Exception:  # pyhpke raises several types for a bad point; all mean the same here
            raise E2eeError("the encapsulated key is not usable") from None
        self.response_nonce = os.urandom(NONCE_SIZE)
        self._response = _ResponseKeys(self._context, enc, self.response_nonce)

    def open_body(self, body: bytes) -> bytes:
        """The plaintext of a whole framed request body (every frame must authenticate)."""
        reader = FrameReader()
        frames = reader.feed(body)
        reader.finish()
        if not frames:
            raise E2eeError("the encrypted body is empty")
        out = bytearray()
        for ciphertext in frames:
            try:
                out += self._context.open(ciphertext, b"")
            except Exception:
                raise E2eeError("the encrypted body does not authenticate under this server's key") from None
        return bytes(out)

    def seal(self, chunk: bytes) -> bytes:
        """One response frame for ``chunk`` (empty writes produce nothing)."""
        return frame(self._response.seal(chunk)) if chunk else b""


class ClientExchange:
    """The client's side: seal the request to the attested key, open the framed response."""

    def __init__(self, server_public_key: bytes) -> None:
        key = X25519PublicKey.from_public_bytes(server_public_key)
        self.enc, self._context = _suite().create_sender_context(
            KEMKey.from_pyca_cryptography_key(key), info=REQUEST_INFO
        )
        self._reader = FrameReader()
        self._response: _ResponseKeys | None = None

    @property
    def enc_header(self) -> bytes:
        return self.enc.hex().encode("ascii")

    def seal_body(self, plaintext: bytes) -> bytes:
        return frame(self._context.seal(plaintext, b""))

    def start_response(self, nonce_hex: str | None) -> None:
        try:
            nonce = bytes.fromhex(nonce_hex or "")
        except ValueError:
            nonce = b""
        if len(nonce) != NONCE_SIZE:
            raise E2eeError("the response carries no valid Ehbp-Response-Nonce: it is not the server's")
        self._response = _ResponseKeys(self._context, self.enc, nonce)

    def open(self, data: bytes) -> bytes:
        """Plaintext for the frames completed by ``data`` (a partial frame waits)."""
        if self._response is None:
            raise E2eeError("start_response first")
        return b"".join(self._response.open(f) for f in self._reader.feed(data))

    def finish(self) -> None:
        self._reader.finish()


class ReplayGuard:
    """Refuses an encapsulated key seen within ``ttl_s``: a captured request replayed by the host.

    Bounded (``max_entries``, oldest forgotten first) and per process; with a node store or Redis,
    ``shared_store.SharedReplayGuard`` extends it to every process and replica sharing it. A replay
    older than the window (or to another process with no shared store, or while the shared store
    is unreachable) is decrypted and answered, but the answer is encrypted to the original
    client's context, so the replayer learns nothing but its size and timing.
    """

    def __init__(self, ttl_s: float = 3600.0, max_entries: int = 262_144) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def first_use(self, enc: bytes, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        while self._seen and (
            len(self._seen) >= self.max_entries or now - next(iter(self._seen.values())) > self.ttl_s
        ):
            self._seen.popitem(last=False)
        if enc in self._seen:
            return False
        self._seen[enc] = now
        return True


def response_headers(
    exchange: ServerExchange, headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """An encrypted answer's headers: the response nonce; no length (the body is framed, chunked)."""
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", NONCE_HEADER)]
    return [*kept, (NONCE_HEADER, exchange.response_nonce.hex().encode("ascii"))]


def encrypting_send(exchange: ServerExchange, send: Send) -> Send:
    """``send`` for an answer that is not signed (an error): every body byte still encrypted.

    Once the request decrypted, everything the server says about it is for that client only
    (EHBP §5.2: errors are encrypted too).
    """

    async def sealed(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": response_headers(exchange, list(message.get("headers", [])))}
        elif message["type"] == "http.response.body":
            message = {**message, "body": exchange.seal(message.get("body", b""))}
        await send(message)

    return sealed


def open_request(
    private_key: X25519PrivateKey, replays: ReplayGuard, enc_header: bytes, ciphertext: bytes
) -> tuple[ServerExchange, bytes]:
    """The exchange and plaintext of an encrypted request body, or ``E2eeRefusal`` with its answer.

    One generic answer per class (malformed, does not authenticate, replayed): no oracle on which
    cryptographic step failed.
    """
    try:
        exchange = ServerExchange(private_key, enc_header)
        plaintext = exchange.open_body(ciphertext)
    except E2eeError as exc:
        if "authenticate" in str(exc):
            message = "the body does not decrypt under this server's attested key: attest again"
            raise E2eeRefusal(422, "e2ee_key_mismatch", message) from None
        raise E2eeRefusal(400, "e2ee_malformed", str(exc)) from None
    if not replays.first_use(exchange.enc):
        raise E2eeRefusal.replayed()
    return exchange, plaintext
