"""TDX v4 quotes: a strict parser and the ECDSA structure check (the simulator: tdx_simulated).

Layout (Intel TDX DCAP Quote Generation Library, quote format v4)::

    0    header (48)          version u16, att_key_type u16, tee_type u32, qe_svn u16, pce_svn u16,
                              qe_vendor_id (16), user_data (20)
    48   TD report body (584) ... mrtd 184, mrconfigid 232, rtmr0..3 376..568, report_data 568..632
    632  sig_data_len u32
    636  signature (64, r‖s) ‖ attestation key (64, x‖y) ‖ cert data type u16 ‖ size u32 ‖ cert data

Certification data type 6 is the QE report (384) ‖ its signature (64) ‖ auth data size u16 ‖ auth
data ‖ a nested type 5 certification data: the PCK certificate chain as PEM, leaf first.

``verify_quote_ecdsa`` checks only the signatures that live inside the quote, against a root the
caller names. It does not evaluate TCB status, CRLs, QE identity or validity dates: that is Intel
collateral's job (dcap-qvl). It serves simulated quotes, and real ones as a structural cross-check.
"""

from __future__ import annotations

import base64
import hashlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from tee_inference.exceptions import EvidenceError, FormatError

QUOTE_VERSION_4: Final = 4
ATT_KEY_TYPE_ECDSA_P256: Final = 2
TEE_TYPE_TDX: Final = 0x81
INTEL_QE_VENDOR_ID: Final = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_DATA_PCK_CHAIN: Final = 5
CERT_DATA_QE_REPORT: Final = 6

HEADER_SIZE: Final = 48
TD_REPORT_SIZE: Final = 584
SIGNED_REGION_SIZE: Final = HEADER_SIZE + TD_REPORT_SIZE  # 632
SIG_DATA_OFFSET: Final = SIGNED_REGION_SIZE + 4  # 636
QE_REPORT_SIZE: Final = 384
TD_ATTRIBUTES_DEBUG: Final = 1 << 0
SIMULATED_MARKER: Final = "SIMULATED"

# The steps verify_quote_ecdsa names in a QuoteSignatureError.
STEP_PCK_CHAIN: Final = "pck_chain"
STEP_QE_REPORT_SIGNATURE: Final = "qe_report_signature"
STEP_QE_REPORT_DATA: Final = "qe_report_data"
STEP_QUOTE_SIGNATURE: Final = "quote_signature"
STEP_CERTIFICATION_DATA: Final = "certification_data"

_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n((?:[A-Za-z0-9+/=]+\r?\n)+)-----END CERTIFICATE-----"
)


# Only line breaks may sit between certificates: any other byte there would be covered by no signature.
_SEPARATOR = re.compile(rb"(?:\r?\n)?")


# Certificate fields parse lazily, so a damaged certificate can load and fail only at first use.
_CERTIFICATE_ERRORS: Final = (
    ValueError, TypeError, UnsupportedAlgorithm, x509.ExtensionNotFound, x509.DuplicateExtension,
)  # fmt: skip


class QuoteFormatError(FormatError):
    """The bytes are not a well-formed TDX v4 quote; the message names the field and its offset."""


class QuoteSignatureError(EvidenceError, ValueError):
    """A signature or binding inside the quote does not hold; ``step`` names which one."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdReport:
    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)


@dataclass(frozen=True)
class QeReport:
    """The SGX report body of the quoting enclave (what the PCK key signs)."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class Quote:
    header: QuoteHeader
    td_report: TdReport
    raw: bytes = field(repr=False)
    sig_data_len: int
    signature: bytes = field(repr=False)
    attestation_key: bytes = field(repr=False)
    certification_data_type: int
    certification_data: bytes = field(repr=False)
    # Present only for certification data type 6 (every TDX quote from Intel's QE).
    qe_report: QeReport | None
    qe_report_signature: bytes | None = field(repr=False)
    qe_auth_data: bytes | None = field(repr=False)
    pck_chain_pem: bytes | None = field(repr=False)
    padding_length: int

    @property
    def signed_region(self) -> bytes:
        """Header and TD report body: the bytes the attestation key signs."""
        return self.raw[:SIGNED_REGION_SIZE]

    @property
    def report_data(self) -> bytes:
        return self.td_report.report_data


def td_debug(td_report: TdReport) -> bool:
    """True when the TD runs in DEBUG mode (its memory is readable by the host)."""
    return bool(int.from_bytes(td_report.td_attributes, "little") & TD_ATTRIBUTES_DEBUG)


class _Reader:
    """A cursor over the quote that turns every short read into a QuoteFormatError."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def take(self, size: int, name: str) -> bytes:
        if self.pos + size > self.end:
            raise QuoteFormatError(
                f"{name} at offset {self.pos} needs {size} bytes but only {self.end - self.pos} remain"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u16(self, name: str) -> int:
        return int.from_bytes(self.take(2, name), "little")

    def u32(self, name: str) -> int:
        return int.from_bytes(self.take(4, name), "little")

    def expect_end(self, name: str) -> None:
        if self.pos != self.end:
            raise QuoteFormatError(
                f"{name} ends at offset {self.end} but its content ends at {self.pos}"
                f" ({self.end - self.pos} unexplained bytes)"
            )


def _parse_header(r: _Reader) -> QuoteHeader:
    header = QuoteHeader(
        version=r.u16("header.version"),
        att_key_type=r.u16("header.att_key_type"),
        tee_type=r.u32("header.tee_type"),
        qe_svn=r.u16("header.qe_svn"),
        pce_svn=r.u16("header.pce_svn"),
        qe_vendor_id=r.take(16, "header.qe_vendor_id"),
        user_data=r.take(20, "header.user_data"),
    )
    if header.version != QUOTE_VERSION_4:
        raise QuoteFormatError(
            f"header.version at offset 0 is {header.version}; only TDX quote v4 is supported"
        )
    if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise QuoteFormatError(
            f"header.att_key_type at offset 2 is {header.att_key_type}; only 2 (ECDSA-P256) is supported"
        )
    if header.tee_type != TEE_TYPE_TDX:
        raise QuoteFormatError(f"header.tee_type at offset 4 is {header.tee_type:#x}; expected 0x81 (TDX)")
    return header


def _parse_td_report(r: _Reader) -> TdReport:
    sizes = (
        ("tee_tcb_svn", 16), ("mrseam", 48), ("mrsignerseam", 48), ("seam_attributes", 8),
        ("td_attributes", 8), ("xfam", 8), ("mrtd", 48), ("mrconfigid", 48), ("mrowner", 48),
        ("mrownerconfig", 48), ("rtmr0", 48), ("rtmr1", 48), ("rtmr2", 48), ("rtmr3", 48),
        ("report_data", 64),
    )  # fmt: skip
    return TdReport(**{name: r.take(size, f"td_report.{name}") for name, size in sizes})


def parse_qe_report(data: bytes) -> QeReport:
    """Parse a 384-byte SGX report body (the QE report inside certification data type 6)."""
    if len(data) != QE_REPORT_SIZE:
        raise QuoteFormatError(f"QE report must be {QE_REPORT_SIZE} bytes, got {len(data)}")
    r = _Reader(data, 0, QE_REPORT_SIZE)
    cpu_svn, misc_select = r.take(16, "qe_report.cpu_svn"), r.u32("qe_report.misc_select")
    r.take(28, "qe_report.reserved1")
    attributes, mrenclave = r.take(16, "qe_report.attributes"), r.take(32, "qe_report.mrenclave")
    r.take(32, "qe_report.reserved2")
    mrsigner = r.take(32, "qe_report.mrsigner")
    r.take(96, "qe_report.reserved3")
    isv_prod_id, isv_svn = r.u16("qe_report.isv_prod_id"), r.u16("qe_report.isv_svn")
    r.take(60, "qe_report.reserved4")
    report_data = r.take(64, "qe_report.report_data")
    return QeReport(
        cpu_svn, misc_select, attributes, mrenclave, mrsigner, isv_prod_id, isv_svn, report_data, data
    )


def parse_quote(data: bytes) -> Quote:
    """Parse a binary TDX v4 quote, accepting trailing zero padding and nothing else unexplained."""
    data = bytes(data)
    r = _Reader(data, 0, len(data))
    header = _parse_header(r)
    td_report = _parse_td_report(r)
    sig_data_len = r.u32("sig_data_len")
    if SIG_DATA_OFFSET + sig_data_len > len(data):
        raise QuoteFormatError(
            f"sig_data_len at offset {SIGNED_REGION_SIZE} is {sig_data_len} but only "
            f"{len(data) - SIG_DATA_OFFSET} bytes follow offset {SIG_DATA_OFFSET} (truncated quote?)"
        )
    sig_end = SIG_DATA_OFFSET + sig_data_len
    # Quote generators round the buffer up; the tail is zero. Anything else was not produced by a QE.
    tail = data[sig_end:]
    if tail.strip(b"\0"):
        first = sig_end + next(i for i, b in enumerate(tail) if b)
        raise QuoteFormatError(
            f"non-zero byte {data[first]:#04x} at offset {first} in the padding after the signature data "
            f"(which ends at {sig_end}); the quote was altered or is not a single quote"
        )
    r = _Reader(data, SIG_DATA_OFFSET, sig_end)
    signature = r.take(64, "sig_data.signature")
    attestation_key = r.take(64, "sig_data.attestation_key")
    cert_type = r.u16("sig_data.certification_data_type")
    cert_size = r.u32("sig_data.certification_data_size")
    cert_offset = r.pos
    cert_data = r.take(cert_size, f"certification data (type {cert_type})")
    r.expect_end("sig_data (per sig_data_len)")

    qe_report = qe_sig = auth = pck_pem = None
    if cert_type == CERT_DATA_QE_REPORT:
        c = _Reader(data, cert_offset, cert_offset + cert_size)
        qe_report = parse_qe_report(c.take(QE_REPORT_SIZE, "qe_report"))
        qe_sig = c.take(64, "qe_report_signature")
        auth = c.take(c.u16("qe_auth_data_size"), "qe_auth_data")
        nested_type = c.u16("nested certification_data_type")
        if nested_type != CERT_DATA_PCK_CHAIN:
            raise QuoteFormatError(
                f"nested certification data type at offset {c.pos - 2} is {nested_type}; "
                f"expected {CERT_DATA_PCK_CHAIN} (PCK certificate chain)"
            )
        pck_pem = c.take(c.u32("nested certification_data_size"), "pck_chain_pem")
        c.expect_end("certification data type 6")
    return Quote(
        header=header, td_report=td_report, raw=data, sig_data_len=sig_data_len, signature=signature,
        attestation_key=attestation_key, certification_data_type=cert_type, certification_data=cert_data,
        qe_report=qe_report, qe_report_signature=qe_sig, qe_auth_data=auth, pck_chain_pem=pck_pem,
        padding_length=len(tail),
    )  # fmt: skip


def load_quote(data: bytes | str) -> Quote:
    """Parse a quote given as raw bytes or as hex text (optional ``0x``, surrounding whitespace)."""
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        # A binary v4 quote starts with 04 00, which is never hex text, so this cannot misfire.
        if re.fullmatch(rb"\s*(0[xX])?[0-9a-fA-F]+\s*", raw) is None:
            return parse_quote(raw)
        data = raw.decode("ascii")
    text = data.strip()
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise QuoteFormatError(f"quote text is neither a binary quote nor valid hex: {exc}") from None
    return parse_quote(raw)


def load_pck_chain(pem: bytes) -> list[x509.Certificate]:
    """Load the PCK chain PEM from a quote, leaf first, insisting on canonical base64.

    Lenient PEM readers skip odd whitespace and ignore unused base64 bits; bytes that no signature
    covers must not be changeable, so each block must re-encode to exactly the text it came from.
    """
    text = pem.rstrip(b"\0")  # Intel's QE NUL-terminates the chain
    certs: list[x509.Certificate] = []
    pos = 0
    for match in _PEM_BLOCK.finditer(text):
        if _SEPARATOR.fullmatch(text[pos : match.start()]) is None:
            raise QuoteFormatError(f"unexpected bytes before certificate {len(certs)} in the PCK chain")
        body = re.sub(rb"\r?\n", b"", match.group(1))
        try:
            der = base64.b64decode(body, validate=True)
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise QuoteFormatError(
                f"certificate {len(certs)} in the PCK chain does not parse: {exc}"
            ) from None
        if base64.b64encode(der) != body:
            raise QuoteFormatError(f"certificate {len(certs)} in the PCK chain is not canonical base64")
        certs.append(cert)
        pos = match.end()
    if not certs or _SEPARATOR.fullmatch(text[pos:]) is None:
        raise QuoteFormatError("PCK chain is not a sequence of PEM certificates followed by zero padding")
    return certs


def _p256_key(xy: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + xy)


def _raw_signature_valid(key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _subject(cert: x509.Certificate) -> str:
    # A tampered certificate may still load (fields parse lazily) but fail on its subject.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return cert.subject.rfc4514_string()
        except ValueError:
            return "<unparseable subject>"


def _verify_chain(chain: list[x509.Certificate], root: x509.Certificate) -> None:
    issuers = [*chain[1:], root]
    if chain[-1].public_bytes(serialization.Encoding.DER) == root.public_bytes(serialization.Encoding.DER):
        issuers = chain[1:]
    for index, (cert, issuer) in enumerate(zip(chain, issuers, strict=False)):
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca:
            raise QuoteSignatureError(STEP_PCK_CHAIN, f"issuer of certificate {index} is not a CA")
        try:
            cert.verify_directly_issued_by(issuer)
        except (*_CERTIFICATE_ERRORS, InvalidSignature) as exc:
            raise QuoteSignatureError(
                STEP_PCK_CHAIN,
                f"certificate {index} ({_subject(cert)}) is not signed by "
                f"{_subject(issuer)}: {exc or type(exc).__name__}",
            ) from None


def verify_quote_ecdsa(quote: Quote, pck_root: x509.Certificate) -> None:
    """Check the quote's internal ECDSA structure from ``pck_root`` down, or raise QuoteSignatureError.

    Order follows trust: PCK chain to the root, PCK leaf signs the QE report, the QE report binds
    the attestation key, the attestation key signs header and TD report. The first failing step is
    named, so a changed byte is reported where it was changed.
    """
    if quote.qe_report is None or quote.pck_chain_pem is None or quote.qe_report_signature is None:
        raise QuoteSignatureError(
            STEP_CERTIFICATION_DATA,
            f"certification data type is {quote.certification_data_type}; only 6 (QE report with PCK chain)"
            " carries what is needed to check the quote offline",
        )
    try:
        chain = load_pck_chain(quote.pck_chain_pem)
        _verify_chain(chain, pck_root)
        leaf_key = chain[0].public_key()
    except QuoteSignatureError:
        raise
    except _CERTIFICATE_ERRORS as exc:
        raise QuoteSignatureError(STEP_PCK_CHAIN, str(exc) or type(exc).__name__) from None
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey):
        raise QuoteSignatureError(STEP_PCK_CHAIN, "the PCK leaf certificate does not hold an EC key")
    if not _raw_signature_valid(leaf_key, quote.qe_report_signature, quote.qe_report.raw):
        raise QuoteSignatureError(STEP_QE_REPORT_SIGNATURE, "the QE report is not signed by the PCK leaf key")
    expected = hashlib.sha256(quote.attestation_key + (quote.qe_auth_data or b"")).digest() + bytes(32)
    if quote.qe_report.report_data != expected:
        raise QuoteSignatureError(
            STEP_QE_REPORT_DATA,
            "QE report data is not sha256(attestation_key ‖ qe_auth_data) ‖ 32 zero bytes: "
            "the attestation key was not certified by this QE",
        )
    try:
        att_key = _p256_key(quote.attestation_key)
    except ValueError:
        raise QuoteSignatureError(STEP_QUOTE_SIGNATURE, "the attestation key is not a P-256 point") from None
    if not _raw_signature_valid(att_key, quote.signature, quote.signed_region):
        raise QuoteSignatureError(
            STEP_QUOTE_SIGNATURE,
            "the header and TD report (bytes 0–631) are not signed by the attestation key",
        )


def is_simulated_quote(quote: Quote) -> bool:
    """True when the quote's PCK chain ends in a root whose common name says it is SIMULATED.

    A label, not a trust decision: anyone can write that name. It tells a verifier which path to
    take (refuse, or with simulation allowed, ``verify_quote_ecdsa`` under the chain's own root);
    a quote that passes Intel's collateral can never carry such a root.
    """
    if quote.pck_chain_pem is None:
        return False
    try:
        root = load_pck_chain(quote.pck_chain_pem)[-1]
        names = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:  # QuoteFormatError included
        return False
    return any(SIMULATED_MARKER in str(name.value) for name in names)
