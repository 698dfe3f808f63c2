"""NVIDIA Reference Integrity Manifests (RIMs): read, verify, and compare with a device's report.

A RIM is an ISO/IEC 19770-2 SWID tag with TCG RIM-IM attributes, signed in place::

    <SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd" tagId=…>
      <Meta colloquialVersion="550.144.03" edition="GPU|SWITCH" product="GH100|LS10" …/>
      <Payload>
        <Resource type="Measurement" index="N" active="True|False" alternatives="k"
                  ns2:Hash0="hex" … ns2:Hash{k-1}="hex" name=… size="48"/>   (64 for a GPU)
      </Payload>
      <ds:Signature>  enveloped; C14N 1.1; ecdsa-sha384 over a sha384 digest;
                      KeyInfo/X509Data: signer, L3 CA, product CA, root  </ds:Signature>
    </SoftwareIdentity>

``ns2`` is ``http://www.w3.org/2001/04/xmlenc#sha384``. A RIM is trusted when its embedded chain
leads to NVIDIA's "CoRIM signing Root CA" (pinned here) at the time asked, and the signature
verifies with the chain's first certificate. Measurements are then read from what the
signature covers (signxml's ``signed_xml``), never from the document around it.

Comparison (NVIDIA's nvtrust ``verifier.py`` and attestation-sdk ``rim.cpp`` agree): only active
measurements count; a driver RIM and a VBIOS RIM must not both claim an index; golden index
``i`` is the report's block ``i + 1``, whose value must equal one of the alternatives, at the
size the RIM states; index 35 (NVDEC) is skipped when the report says NVDEC is disabled; the
RIM's ``colloquialVersion`` must be the version the report states.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from datetime import datetime
from importlib import resources
from typing import Any, Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from lxml import etree
from signxml.algorithms import DigestAlgorithm, SignatureMethod
from signxml.exceptions import SignXMLException
from signxml.verifier import SignatureConfiguration, XMLVerifier

from tee_inference.attestation.nvidia_certs import GpuCertificateChainError, verify_certificate_chain
from tee_inference.attestation.nvidia_spdm import (
    NVDEC_DISABLED,
    OPAQUE_FIELD_CHIP_INFO,
    OPAQUE_FIELD_CHIP_SKU,
    OPAQUE_FIELD_NVDEC0_STATUS,
    OPAQUE_FIELD_PROJECT,
    OPAQUE_FIELD_PROJECT_SKU,
    GpuAttestationError,
    GpuEvidence,
)
from tee_inference.exceptions import FormatError

# NVIDIA/nvtrust guest_tools/gpu_verifiers/local_gpu_verifier/src/verifier/certs/verifier_RIM_root.pem
# (last changed 08a50685, read at 028173093d43dbf37364bdc39ad7e696bccbce2e), copied byte for
# byte; attestation-sdk ships the same certificate as unit-tests/testdata/trusted_certs/rim_root.crt.
NVIDIA_RIM_ROOT_CA_SHA256: Final = "12977b5115acb0381179279fffeb5a8c4d264971ebb32298023a465fa41df5d1"
_RIM_ROOT_RESOURCE: Final = ("data", "nvidia_rim_root_ca.pem")
RIM_SERVICE_URL: Final = "https://rim.attestation.nvidia.com/v1/rim/"
NVDEC_INDEX: Final = 35
_SWID: Final = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
_DSIG: Final = "http://www.w3.org/2000/09/xmldsig#"
_HASH: Final = "{http://www.w3.org/2001/04/xmlenc#sha384}Hash"
_SIGNATURE: Final = SignatureConfiguration(
    signature_methods=frozenset({SignatureMethod.ECDSA_SHA384}),
    digest_algorithms=frozenset({DigestAlgorithm.SHA384}),
)
# No DTDs, entities or network: a RIM is data from outside.
_PARSER: Final = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


class RimError(GpuAttestationError):
    """A RIM is malformed, untrusted, or its signature does not verify."""


class RimFormatError(RimError, FormatError):
    """The bytes are not a RIM in NVIDIA's SWID form."""


class RimTrustAnchorError(RimError):
    """The shipped RIM root is missing or not the pinned one."""


class HttpClient(Protocol):
    """The part of an ``httpx.Client`` the online checks use; a test passes one on a MockTransport."""

    def get(self, url: str) -> Any: ...

    def post(self, url: str, *, content: bytes, headers: dict[str, str]) -> Any: ...


@dataclass(frozen=True)
class RimMeasurement:
    index: int
    active: bool
    alternatives: tuple[bytes, ...]
    size: int
    name: str


@dataclass(frozen=True)
class Rim:
    """A RIM's content; ``certificates`` are those it embeds, signer first (trusted only once verified)."""

    tag_id: str
    colloquial_version: str
    edition: str
    product: str
    measurements: tuple[RimMeasurement, ...]
    certificates: tuple[x509.Certificate, ...]

    @property
    def active(self) -> dict[int, RimMeasurement]:
        return {m.index: m for m in self.measurements if m.active}


def load_rim_root() -> x509.Certificate:
    """NVIDIA's CoRIM signing Root CA shipped with the package, after checking its pin."""
    try:
        pem = resources.files("tee_inference").joinpath(*_RIM_ROOT_RESOURCE).read_bytes()
        root = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as exc:
        raise RimTrustAnchorError(
            f"cannot load tee_inference/{'/'.join(_RIM_ROOT_RESOURCE)}: {exc}"
        ) from None
    actual = root.fingerprint(hashes.SHA256()).hex()
    if actual != NVIDIA_RIM_ROOT_CA_SHA256:
        raise RimTrustAnchorError(
            f"shipped NVIDIA RIM root has sha256 {actual}, pinned {NVIDIA_RIM_ROOT_CA_SHA256}; reinstall"
        )
    return root


def _root(xml: bytes | Any) -> Any:
    if not isinstance(xml, bytes | bytearray):
        return xml  # an element signxml handed back
    try:
        return etree.fromstring(bytes(xml), parser=_PARSER)
    except etree.XMLSyntaxError as exc:
        raise RimFormatError(f"RIM is not XML: {exc}") from None


def _attr(node: Any, name: str, where: str) -> str:
    value = node.get(name)
    if value is None:
        raise RimFormatError(f"RIM {where} has no {name!r}")
    return str(value)


def _measurement(node: Any) -> RimMeasurement:
    where = f"measurement {node.get('index')!r}"
    try:
        index = int(_attr(node, "index", where))
        count = int(_attr(node, "alternatives", where))
        size = int(_attr(node, "size", where))
        alternatives = tuple(
            bytes.fromhex(_attr(node, f"{_HASH}{k}", where + f" Hash{k}")) for k in range(count)
        )
    except ValueError as exc:
        raise RimFormatError(f"RIM {where}: {exc}") from None
    return RimMeasurement(
        index, _attr(node, "active", where) == "True", alternatives, size, node.get("name", "")
    )


def parse_rim(xml: bytes | Any) -> Rim:
    """A RIM's fields from its bytes (or signxml's signed element); nothing is trusted here."""
    root = _root(xml)
    if root.tag != f"{{{_SWID}}}SoftwareIdentity":
        raise RimFormatError(f"RIM root element is {root.tag}, not a SWID SoftwareIdentity")
    meta = root.find(f"{{{_SWID}}}Meta")
    if meta is None:
        raise RimFormatError("RIM has no Meta element")
    nodes = root.iterfind(f"{{{_SWID}}}Payload/{{{_SWID}}}Resource[@type='Measurement']")
    certs = []
    for node in root.iterfind(f".//{{{_DSIG}}}X509Certificate"):
        try:
            certs.append(x509.load_der_x509_certificate(base64.b64decode("".join(node.text.split()))))
        except (binascii.Error, ValueError, AttributeError) as exc:
            raise RimFormatError(f"RIM X509Certificate does not decode: {exc}") from None
    return Rim(
        tag_id=root.get("tagId", ""),
        colloquial_version=_attr(meta, "colloquialVersion", "Meta"),
        edition=_attr(meta, "edition", "Meta"),
        product=_attr(meta, "product", "Meta"),
        measurements=tuple(_measurement(n) for n in nodes),
        certificates=tuple(certs),
    )


def verify_rim(xml: bytes, root: x509.Certificate, *, at: datetime) -> Rim:
    """The RIM as its signature covers it, once its chain leads to ``root`` and it verifies at ``at``."""
    unsigned = parse_rim(xml)
    if not unsigned.certificates:
        raise RimError("RIM embeds no signing certificate")
    try:
        verify_certificate_chain(unsigned.certificates, root, at=at)
    except GpuCertificateChainError as exc:
        raise RimError(f"RIM {unsigned.colloquial_version} signing chain: {exc}") from None
    config = replace(_SIGNATURE, verification_time=at)
    try:
        result: Any = XMLVerifier().verify(
            bytes(xml), x509_cert=unsigned.certificates[0], expect_config=config
        )
    except (SignXMLException, ValueError) as exc:
        raise RimError(
            f"RIM {unsigned.colloquial_version} signature does not verify: {type(exc).__name__}: {exc}"
        ) from None
    signed = parse_rim(result.signed_xml)
    return Rim(
        signed.tag_id, signed.colloquial_version, signed.edition, signed.product,
        signed.measurements, unsigned.certificates,
    )  # fmt: skip


def _opaque_text(evidence: GpuEvidence, field_id: int) -> str:
    value = evidence.opaque_field(field_id)
    return value.rstrip(b"\x00").decode("ascii", "replace") if value else ""


def driver_rim_id(evidence: GpuEvidence, chip: str) -> str | None:
    """NVIDIA's id of the driver RIM for this report; ``chip`` is the one the device chain names.

    Hopper: ``NV_GPU_DRIVER_GH100_<version>``. Blackwell: ``NV_GPU_CC_DRIVER_<chip>_<version>``,
    the chip from opaque field CHIP_INFO, GB100 when the report has none (as NVIDIA's SDK does).
    """
    if evidence.driver_version is None:
        return None  # an NVSwitch has no driver
    if chip.startswith("GH"):
        return f"NV_GPU_DRIVER_{chip}_{evidence.driver_version}"
    blackwell_chip = _opaque_text(evidence, OPAQUE_FIELD_CHIP_INFO) or "GB100"
    return f"NV_GPU_CC_DRIVER_{blackwell_chip}_{evidence.driver_version}"


def vbios_rim_id(evidence: GpuEvidence, *, switch: bool) -> str:
    """NVIDIA's id of the VBIOS RIM: project, SKUs from the opaque data (constants for LS10)."""
    version = evidence.vbios_version.replace(".", "").upper()
    if switch:
        return f"NV_SWITCH_BIOS_5612_0002_890_{version}"
    parts = (
        _opaque_text(evidence, f)
        for f in (OPAQUE_FIELD_PROJECT, OPAQUE_FIELD_PROJECT_SKU, OPAQUE_FIELD_CHIP_SKU)
    )
    return "NV_GPU_VBIOS_" + "_".join(parts) + f"_{version}"


def fetch_rim(client: HttpClient, rim_id: str) -> bytes:
    """One RIM from NVIDIA's RIM service through ``client`` (``{"rim": base64 XML}``)."""
    reply = client.get(RIM_SERVICE_URL + rim_id)
    if reply.status_code != 200:
        raise RimError(f"RIM service answered {reply.status_code} for {rim_id}")
    try:
        return base64.b64decode(reply.json()["rim"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise RimFormatError(f"RIM service reply for {rim_id} has no base64 'rim': {exc}") from None


def compare_rims(evidence: GpuEvidence, vbios: Rim, driver: Rim | None = None) -> list[str]:
    """Why the report's measurements are not those the RIMs state; empty when they are."""
    problems = []
    if vbios.colloquial_version.upper() != evidence.vbios_version.upper():
        problems.append(
            f"VBIOS RIM is for {vbios.colloquial_version}, the report says {evidence.vbios_version}"
        )
    golden: dict[int, tuple[str, RimMeasurement]] = {i: ("VBIOS", m) for i, m in vbios.active.items()}
    if driver is not None:
        if driver.colloquial_version != evidence.driver_version:
            problems.append(
                f"driver RIM is for {driver.colloquial_version}, the report says {evidence.driver_version}"
            )
        overlap = sorted(set(golden) & set(driver.active))
        if overlap:
            problems.append(f"driver and VBIOS RIMs both claim index(es) {overlap}")
        golden.update({i: ("driver", m) for i, m in driver.active.items() if i not in golden})
    runtime = {block.index: block.value for block in evidence.measurements}
    nvdec_off = evidence.opaque_field(OPAQUE_FIELD_NVDEC0_STATUS) == bytes((NVDEC_DISABLED,))
    mismatched = []
    for index in sorted(golden):
        source, expected = golden[index]
        if index == NVDEC_INDEX and nvdec_off:
            continue  # NVDEC is off: its measurement is not meaningful
        value = runtime.get(index + 1)
        if value is None:
            mismatched.append(f"{index} ({source}: no block {index + 1} in the report)")
        elif len(value) != expected.size or value not in expected.alternatives:
            mismatched.append(f"{index} ({source})")
    if mismatched:
        problems.append(f"measurement(s) {', '.join(mismatched)} match no alternative in the RIM")
    return problems
