"""TLS that ends inside the CVM: the server's own key, its certificate, and the files a server reads.

Prompts must not cross the host in clear, so the TLS key is made (or handed by dstack's agent)
inside the CVM at boot and never leaves it. Its SPKI hash is recorded in RTMR3 with the boot's
other keys and can be bound into a quote's report_data, so a client pins the live connection to
the attested key rather than to a certificate authority. Modes (``serve --tls``):

    self-signed  key derived at boot, self-signed certificate (clients pin the attested SPKI)
    files        key derived at boot; the certificate is the operator's, issued by any CA for
                 the CSR the server publishes (GET /v1/tls/csr) and installed without a restart
                 (POST /v1/tls/certificate, or a file at --tls-cert): the key never moves
    dstack       key and certificate from the dstack guest agent (GetTlsKey), signed by the app CA
    off          plain HTTP: loopback development only; with --tee tdx only when asked loudly

Python's ssl and uvicorn (ours and vLLM's) read keys from files, so the key is written to a
private directory on a RAM file system (tmpfs) with mode 0600 and removed at exit: it never
reaches a disk or the image (``KeyFiles``).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tee_inference.exceptions import ConfigError, TrustRootError

if TYPE_CHECKING:
    from tee_inference.config import ServerConfig

log = logging.getLogger("tee_inference.tls")

TLS_MODES: Final = ("self-signed", "files", "dstack", "off")
# Modern suites only. TLS 1.3 suites are fixed by OpenSSL; this list governs TLS 1.2, the oldest
# version Python's server contexts accept (minimum_version is TLSv1_2 by default and set anyway).
CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"
RAM_FILESYSTEMS: Final = frozenset({"tmpfs", "ramfs"})
_DEFAULT_NAMES: Final = ("localhost", "127.0.0.1", "::1")


def spki_sha256(certificate: x509.Certificate) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: the fingerprint nearai, Tinfoil and we all pin."""
    der = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def _same_key(a: object, b: ec.EllipticCurvePublicKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return isinstance(a, ec.EllipticCurvePublicKey) and a.public_bytes(*fmt) == b.public_bytes(*fmt)


def _subject_alt_names(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def self_signed_certificate(key: ec.EllipticCurvePrivateKey, names: tuple[str, ...]) -> x509.Certificate:
    """A server certificate for ``key`` naming ``names``; trust comes from the quote, not from it."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "tee-inference")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=397))
        .add_extension(_subject_alt_names(names or _DEFAULT_NAMES), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )


def certificate_request(key: ec.EllipticCurvePrivateKey, names: tuple[str, ...]) -> bytes:
    """A PEM CSR for ``key``: what an operator takes to a CA, so the key itself never moves."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "tee-inference")])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(_subject_alt_names(names or _DEFAULT_NAMES), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_chain_for_key(chain_pem: bytes, public_key: ec.EllipticCurvePublicKey) -> list[x509.Certificate]:
    """A PEM chain whose leaf certifies ``public_key``; ConfigError otherwise (never another key)."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate chain: {exc}") from None
    if not _same_key(chain[0].public_key(), public_key):
        raise ConfigError("the certificate's key is not this server's TLS key: issue it for the server's CSR")
    return chain


def _check_current(leaf: x509.Certificate, now: datetime | None = None) -> None:
    """A certificate to install must be valid now: an expired one would break every client."""
    now = now or datetime.now(UTC)
    if now < leaf.not_valid_before_utc:
        raise ConfigError(
            f"the certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    if now > leaf.not_valid_after_utc:
        raise ConfigError(f"the certificate expired at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")


@dataclass
class TlsIdentity:
    """This boot's TLS key and certificate chain (leaf first). The key stays in this process."""

    mode: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: list[x509.Certificate]
    csr_pem: bytes | None = None

    @property
    def spki_sha256(self) -> bytes:
        return spki_sha256(self.chain[0])

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def install_chain(self, chain_pem: bytes) -> None:
        """Take a renewed or CA-issued chain for the same key (the SPKI, and so the binding, stays)."""
        self.chain = load_chain_for_key(chain_pem, self.key.public_key())


def filesystem_type(path: Path) -> str | None:
    """The file system type of the mount holding ``path`` (from /proc/self/mountinfo), or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    resolved = str(path.resolve())
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4]
        fs_type = line.split(" - ", 1)[1].split()[0]
        if (resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")) and len(
            mount_point
        ) >= len(best):
            best, kind = mount_point, fs_type
    return kind


class KeyFiles:
    """The key and chain as files in a private directory on a RAM file system, for ssl to read.

    The directory is 0700 and the files 0600, made by this process; ``close`` removes them. A
    certificate is replaced by writing a new file and renaming it over the old one, so a reader
    (our reloader, vLLM's --enable-ssl-refresh) never sees half a chain.
    """

    def __init__(self, identity: TlsIdentity, base: Path | None = None, *, require_ram: bool = True) -> None:
        base = base if base is not None else _ram_base()
        kind = filesystem_type(base)
        if require_ram and kind not in RAM_FILESYSTEMS:
            raise TrustRootError(
                f"{base} is on {kind or 'an unknown file system'}, not tmpfs: the TLS key would reach a disk"
            )
        self.directory = Path(tempfile.mkdtemp(prefix="tee-inference-tls-", dir=base))
        os.chmod(self.directory, 0o700)
        self.key_path = self.directory / "key.pem"
        self.cert_path = self.directory / "chain.pem"
        _write_private(self.key_path, identity.key_pem())
        _write_private(self.cert_path, identity.chain_pem())

    def replace_chain(self, chain_pem: bytes) -> None:
        staging = self.directory / "chain.pem.new"
        _write_private(staging, chain_pem)
        staging.replace(self.cert_path)

    def close(self) -> None:
        for path in (self.key_path, self.cert_path, self.directory / "chain.pem.new"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()


def _ram_base() -> Path:
    """Where private RAM-backed files go: $XDG_RUNTIME_DIR when it is one, else /dev/shm."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and filesystem_type(Path(runtime)) in RAM_FILESYSTEMS:
        return Path(runtime)
    return Path("/dev/shm")  # noqa: S108 - a private 0700 directory is made inside it


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def server_context(files: KeyFiles) -> ssl.SSLContext:
    """A server context with our secure defaults: TLS 1.2 or later, ECDHE with AEAD only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.load_cert_chain(files.cert_path, files.key_path)
    return context


class TlsService:
    """What a serving process knows of this boot's TLS: the chain, the CSR, and where the files are.

    The launcher holds the key (``identity``) and writes the files; a vLLM API process resumes
    with the public part only and installs a new chain by replacing the certificate file, which
    vLLM's own refresher reloads. ``context`` is set when our own uvicorn serves, and reloaded here.
    """

    def __init__(
        self,
        mode: str,
        chain: list[x509.Certificate],
        *,
        identity: TlsIdentity | None = None,
        csr_pem: bytes | None = None,
        cert_path: Path | None = None,
    ) -> None:
        self.mode = mode
        self.chain = chain
        self.identity = identity
        self.csr_pem = csr_pem
        self.cert_path = cert_path
        self.files: KeyFiles | None = None
        self.context: ssl.SSLContext | None = None

    @classmethod
    def from_identity(cls, identity: TlsIdentity) -> TlsService:
        return cls(identity.mode, list(identity.chain), identity=identity, csr_pem=identity.csr_pem)

    @property
    def spki_sha256(self) -> bytes:
        return spki_sha256(self.chain[0])

    def write_files(self, base: Path | None, *, require_ram: bool) -> KeyFiles:
        """The key and chain on a RAM file system, for uvicorn (ours or vLLM's) to load."""
        if self.identity is None:
            raise TrustRootError("only the process that holds the TLS key can write its files")
        self.files = KeyFiles(self.identity, base, require_ram=require_ram)
        self.cert_path = self.files.cert_path
        return self.files

    def serve_context(self) -> ssl.SSLContext:
        if self.files is None:
            raise TrustRootError("the TLS files are not written yet")
        self.context = server_context(self.files)
        return self.context

    def install(self, chain_pem: bytes) -> None:
        """Install a CA-issued or renewed chain for the same key: new handshakes present it."""
        public_key = self.chain[0].public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ConfigError("this server's TLS key is not an EC key; certificates cannot be installed")
        chain = load_chain_for_key(chain_pem, public_key)
        _check_current(chain[0])
        if self.cert_path is None:
            raise ConfigError("no certificate file to replace: TLS is not served from files here")
        if self.files is not None:
            self.files.replace_chain(chain_pem)
        else:
            staging = self.cert_path.with_name(self.cert_path.name + ".new")
            _write_private(staging, chain_pem)
            staging.replace(self.cert_path)
        if self.context is not None and self.files is not None:
            self.context.load_cert_chain(self.files.cert_path, self.files.key_path)
        self.chain = chain
        if self.identity is not None:
            self.identity.chain = chain

    def state(self) -> dict[str, str | None]:
        """The public part a resuming process needs (never the key)."""
        return {
            "mode": self.mode,
            "chain": b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain).decode(),
            "csr": self.csr_pem.decode() if self.csr_pem else None,
            "cert_path": str(self.cert_path) if self.cert_path else None,
        }

    @classmethod
    def resume(cls, state: dict[str, str | None]) -> TlsService:
        chain = x509.load_pem_x509_certificates(str(state["chain"]).encode())
        csr, path = state.get("csr"), state.get("cert_path")
        return cls(
            str(state["mode"]),
            chain,
            csr_pem=csr.encode() if csr else None,
            cert_path=Path(path) if path else None,
        )

    def close(self) -> None:
        if self.files is not None:
            self.files.close()


def tls_for_boot(config: ServerConfig, derived: ec.EllipticCurvePrivateKey) -> TlsService | None:
    """This boot's TLS as the configuration names it (None with --tls off).

    ``derived`` is the TLS key the boot derived from its root secret (keys.derive_tls_key): ours
    in self-signed and files mode, unused when dstack's agent hands the key.
    """
    names = config.tls_names
    if config.tls == "off":
        return None
    if config.tls == "dstack":
        from tee_inference.tee.dstack import DstackClient

        agent = DstackClient(config.dstack_socket)
        try:
            given = agent.get_tls_key(names[0] if names else "tee-inference", names)
        finally:
            agent.close()
        key = serialization.load_pem_private_key(given.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TrustRootError("dstack GetTlsKey gave a key that is not an EC key")
        chain = load_chain_for_key(b"".join(given.chain_pem), key.public_key())
        return TlsService.from_identity(TlsIdentity("dstack", key, chain))
    if config.tls_key is not None:  # files, development only (refused with tdx by the config)
        loaded = serialization.load_pem_private_key(_read(config.tls_key), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{config.tls_key}: only EC (P-256, P-384) TLS keys are supported")
        key = loaded
    else:
        key = derived
    csr = certificate_request(key, names) if config.tls == "files" else None
    chain = [self_signed_certificate(key, names)]
    if config.tls == "files" and config.tls_cert is not None and config.tls_cert.exists():
        chain = load_chain_for_key(_read(config.tls_cert), key.public_key())
    return TlsService.from_identity(TlsIdentity(config.tls, key, chain, csr))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


class CertificateWatcher:
    """Installs the chain at ``path`` whenever the file changes (a renewed CA certificate).

    Polls the modification time: renewals are rare, and polling needs no extra dependency and
    works on every file system a volume may bring. A chain for another key is refused and logged.
    """

    def __init__(self, tls: TlsService, path: Path, interval_s: float = 5.0) -> None:
        self.tls, self.path, self.interval_s = tls, path, interval_s
        self._seen = self._stamp()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-certificate-watcher", daemon=True)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def start(self) -> CertificateWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check_once(self) -> bool:
        """Install the file if it changed since the last look; True when a chain was installed."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            self.tls.install(self.path.read_bytes())
        except (ConfigError, OSError) as exc:
            log.warning("TLS certificate at %s not installed: %s", self.path, exc)
            return False
        log.info("TLS certificate at %s installed (SPKI unchanged)", self.path)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_once()
