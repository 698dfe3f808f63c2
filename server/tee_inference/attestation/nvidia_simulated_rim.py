"""Simulated NVIDIA RIMs: NVIDIA's SWID layout, signed like theirs, under a SIMULATED CoRIM root.

The chain mirrors a real RIM's (root first: CoRIM signing Root CA, Reference Value CA, L3,
L4 signer), every name saying SIMULATED; so a simulated RIM verifies only under its own root
and never under the pinned NVIDIA one. The signature is enveloped XMLDSig with C14N 1.1 and
ECDSA-P384/SHA-384, the certificates in ``KeyInfo/X509Data``, as in NVIDIA's files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from lxml import etree
from signxml.algorithms import (
    CanonicalizationMethod,
    DigestAlgorithm,
    SignatureConstructionMethod,
    SignatureMethod,
)
from signxml.signer import XMLSigner

from tee_inference.attestation.nvidia_simulated import (
    SIM_NOT_BEFORE,
    SimulatedGpu,
    derive_p384_key,
    simulated_name,
)

_SWID: Final = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
_SHA384_NS: Final = "http://www.w3.org/2001/04/xmlenc#sha384"
_RIMIM_NS: Final = (
    "https://trustedcomputinggroup.org/resource/tcg-reference-integrity-manifest-rim-information-model/"
)
_GPU_RIM_INDICES: Final = 64


class SimulatedRimSigner:
    """Signs RIMs with a four-certificate SIMULATED chain fixed by ``seed``.

    ``signer_not_after`` ends the L4 signer's validity, to exercise expiry.
    """

    def __init__(self, seed: bytes, *, signer_not_after: datetime = datetime(2099, 1, 1, tzinfo=UTC)) -> None:
        subjects = (  # root first
            "SIMULATED NVIDIA CoRIM signing Root CA",
            "SIMULATED NVIDIA Reference Value GH100 CA",
            "SIMULATED NVIDIA Reference Value L3 GH100 001",
            "SIMULATED HCC RIM L4 Signer",
        )
        keys = [derive_p384_key(seed, f"rim key {depth}") for depth in range(len(subjects))]
        certs: list[x509.Certificate] = []
        for depth, cn in enumerate(subjects):
            leaf = depth == len(subjects) - 1
            issuer = depth - 1 if depth else 0
            builder = (
                x509.CertificateBuilder()
                .subject_name(simulated_name(cn))
                .issuer_name(simulated_name(subjects[issuer]))
                .public_key(keys[depth].public_key())
                .serial_number(int.from_bytes(hashlib.sha256(seed + cn.encode()).digest()[:16], "big") | 1)
                .not_valid_before(SIM_NOT_BEFORE)
                .not_valid_after(signer_not_after if leaf else datetime(2099, 12, 31, tzinfo=UTC))
                .add_extension(x509.BasicConstraints(ca=not leaf, path_length=None), critical=True)
            )
            certs.append(builder.sign(keys[issuer], hashes.SHA384(), ecdsa_deterministic=True))
        self.private_keys = tuple(reversed(keys))  # signer first; a test's OCSP responder uses the CAs'
        self.certificates = tuple(reversed(certs))  # signer first, as a RIM embeds them

    @property
    def root_certificate(self) -> x509.Certificate:
        return self.certificates[-1]

    def sign(
        self,
        *,
        version: str,
        measurements: Mapping[int, Sequence[bytes]],
        product: str = "GH100",
        edition: str = "GPU",
        indices: int = _GPU_RIM_INDICES,
    ) -> bytes:
        """A signed RIM naming ``version``, with ``measurements`` (index -> alternatives) active."""
        root = etree.Element(
            f"{{{_SWID}}}SoftwareIdentity", nsmap={None: _SWID, "ns0": _SWID, "ns2": _SHA384_NS},
            name=product, tagId=hashlib.sha384(f"{product} {edition} {version}".encode()).hexdigest(),
            version="1.0", tagVersion="0", corpus="false", patch="false", supplemental="false",
        )  # fmt: skip
        etree.SubElement(root, f"{{{_SWID}}}Entity", name="SIMULATED (not NVIDIA)", role="softwareCreator")
        meta = etree.SubElement(
            root, f"{{{_SWID}}}Meta", nsmap={"ns1": _RIMIM_NS},
            colloquialVersion=version, edition=edition, product=product, revision="r1",
        )  # fmt: skip
        meta.set(f"{{{_RIMIM_NS}}}BindingSpec", "RIMIM")
        payload = etree.SubElement(root, f"{{{_SWID}}}Payload")
        for index in range(indices):
            values = measurements.get(index) or (bytes(48),)
            node = etree.SubElement(
                payload, f"{{{_SWID}}}Resource", type="Measurement", index=str(index),
                active=str(index in measurements), alternatives=str(len(values)),
                name=f"Measurement_{index}", size=str(len(values[0])),
            )  # fmt: skip
            for k, value in enumerate(values):
                node.set(f"{{{_SHA384_NS}}}Hash{k}", value.hex())
        signer = XMLSigner(
            method=SignatureConstructionMethod.enveloped,
            signature_algorithm=SignatureMethod.ECDSA_SHA384,
            digest_algorithm=DigestAlgorithm.SHA384,
            c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1,
        )
        signed: Any = signer.sign(root, key=self.private_keys[0], cert=list(self.certificates))
        return bytes(etree.tostring(signed, xml_declaration=False))


def rim_measurements(gpu: SimulatedGpu, indices: Sequence[int]) -> dict[int, tuple[bytes, ...]]:
    """Golden values for ``indices`` that this GPU's report meets (golden ``i`` is block ``i + 1``)."""
    blocks = {b.index: b.value for b in gpu.measurements()}
    return {i: (blocks[i + 1],) for i in indices}
