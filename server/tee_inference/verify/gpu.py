"""GPU evidence checks on an NRAS-form ``nvidia_payload``: chains, evidence signatures, nonce, NRAS.

Offline, each GPU's certificate chain must lead to NVIDIA's pinned Device Identity CA, the SPDM
report must be signed by the chain's leaf, the leaf's FWID must equal the report's, and the
request nonce inside the signed report must be the expected one. Asking NRAS is online and
optional: it adds NVIDIA's verdict on the measurements (RIMs), which no offline check has.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from cryptography import x509

from tee_inference.attestation.nvidia_certs import certificate_fwid, verify_certificate_chain
from tee_inference.attestation.nvidia_nras import parse_nras_response, verify_nras_jwt
from tee_inference.attestation.nvidia_payload import NvidiaPayload
from tee_inference.attestation.nvidia_spdm import (
    OPAQUE_FIELD_FWID,
    GpuAttestationError,
    GpuNonceMismatchError,
    verify_evidence_nonce,
    verify_evidence_signature,
)
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.results import CheckResult
from tee_inference.verify.trust import fingerprint, names_simulated, subject

GPU_CHAIN, GPU_EVIDENCE, GPU_NONCE, GPU_NRAS = "gpu_chain", "gpu_evidence", "gpu_nonce", "gpu_nras"
NRAS_URL: Final = "https://nras.attestation.nvidia.com/v3/attest/gpu"
NRAS_JWKS_URL: Final = "https://nras.attestation.nvidia.com/.well-known/jwks.json"


@dataclass(frozen=True)
class GpuChecks:
    checks: tuple[CheckResult, ...]
    simulated: bool
    gpus: tuple[str, ...] = ()  # one line per GPU: driver and VBIOS versions


def _skip_all(reason: str, *, required: bool = True) -> tuple[CheckResult, ...]:
    return tuple(
        CheckResult.skipped(n, reason, required=required) for n in (GPU_CHAIN, GPU_EVIDENCE, GPU_NONCE)
    )


def check_gpu(
    payload_text: str | None,
    nonce: bytes,
    policy: VerificationPolicy,
    *,
    nvidia_root: x509.Certificate,
) -> GpuChecks:
    """Check every GPU in the payload against ``nonce``; a missing payload fails when GPUs are required."""
    if not payload_text:
        if policy.require_gpu:
            return GpuChecks((CheckResult.failed(GPU_EVIDENCE, "the report carries no GPU evidence"),), False)
        return GpuChecks(
            _skip_all("no GPU evidence, and the policy does not require a GPU", required=False), False
        )
    try:
        payload = NvidiaPayload.from_json(payload_text)
    except GpuAttestationError as exc:
        skip = "nvidia_payload did not parse"
        return GpuChecks((
            CheckResult.skipped(GPU_CHAIN, skip), CheckResult.failed(GPU_EVIDENCE, str(exc)),
            CheckResult.skipped(GPU_NONCE, skip),
        ), False)  # fmt: skip
    chain_problems: list[str] = []
    evidence_problems: list[str] = []
    nonce_problems: list[str] = []
    anchors: set[str] = set()
    gpus: list[str] = []
    simulated = False
    if payload.nonce != nonce:
        nonce_problems.append(f"payload nonce is {payload.nonce.hex()}, expected {nonce.hex()}")
    for index, entry in enumerate(payload.entries):
        where = f"GPU {index}"
        try:
            certs = entry.certificates()
            root = certs[-1] if certs else None
            anchor = nvidia_root
            if root is not None and names_simulated(root):
                simulated = True
                if not policy.simulated.allowed:
                    chain_problems.append(
                        f"{where}: chain ends at {subject(root)!r}, a simulator; pass --allow-simulated "
                        "to accept simulated evidence for testing"
                    )
                    certs = []
                anchor = root
            if certs:
                verify_certificate_chain(certs, anchor)
                anchors.add(f"{subject(anchor)} (sha256 {fingerprint(anchor)[:16]}…)")
        except GpuAttestationError as exc:
            chain_problems.append(f"{where}: {exc}")
            certs = []
        try:
            evidence = entry.parse()
        except GpuAttestationError as exc:
            evidence_problems.append(f"{where}: {exc}")
            continue
        try:
            verify_evidence_nonce(evidence, nonce)
        except GpuNonceMismatchError as exc:
            nonce_problems.append(f"{where}: {exc}")
        gpus.append(f"{where}: driver {evidence.driver_version}, VBIOS {evidence.vbios_version}")
        if not certs:
            evidence_problems.append(f"{where}: evidence signature not checked (no trusted chain)")
            continue
        try:
            verify_evidence_signature(evidence, certs[0])
        except GpuAttestationError as exc:
            evidence_problems.append(f"{where}: {exc}")
        fwid, leaf_fwid = evidence.opaque_field(OPAQUE_FIELD_FWID), certificate_fwid(certs[0])
        if fwid is not None and leaf_fwid is not None and fwid != leaf_fwid:
            evidence_problems.append(
                f"{where}: report FWID {fwid.hex()[:16]}… differs from the leaf's {leaf_fwid.hex()[:16]}…"
            )
    count = f"{len(payload.entries)} GPU(s)"
    checks = (
        CheckResult.failed(GPU_CHAIN, "; ".join(chain_problems)) if chain_problems
        else CheckResult.passed(GPU_CHAIN, f"{count}: chain to {', '.join(sorted(anchors))}"),
        CheckResult.failed(GPU_EVIDENCE, "; ".join(evidence_problems)) if evidence_problems
        else CheckResult.passed(GPU_EVIDENCE, f"{count}: SPDM report signed by its leaf; " + "; ".join(gpus)),
        CheckResult.failed(GPU_NONCE, "; ".join(nonce_problems)) if nonce_problems
        else CheckResult.passed(GPU_NONCE, f"{count}: every report was requested with nonce {nonce.hex()}"),
    )  # fmt: skip
    return GpuChecks(checks, simulated, tuple(gpus))


def check_nras(payload_text: str, nonce: bytes, client: Any) -> CheckResult:  # pragma: no cover - network
    """Ask NVIDIA's NRAS about the payload and check its tokens with NVIDIA's published keys.

    ``client`` is an ``httpx.Client``; it is passed in so that nothing here opens a connection
    unless the caller asked for the online check.
    """
    try:
        reply = client.post(NRAS_URL, content=payload_text, headers={"content-type": "application/json"})
        reply.raise_for_status()
        jwks = client.get(NRAS_JWKS_URL).json()
        result = parse_nras_response(reply.json())
        now = datetime.now(UTC)
        for token in result.tokens:
            verify_nras_jwt(token, jwks, at=now)
    except (GpuAttestationError, ValueError, OSError) as exc:
        return CheckResult.failed(GPU_NRAS, f"NRAS: {exc}")
    except Exception as exc:  # httpx errors: reported, never raised past the verdict
        return CheckResult.failed(GPU_NRAS, f"NRAS request failed: {type(exc).__name__}: {exc}")
    problems = []
    if not result.overall_result:
        problems.append("overall attestation result is false")
    if result.eat_nonce.lower() != nonce.hex():
        problems.append(f"eat_nonce {result.eat_nonce} is not {nonce.hex()}")
    for gpu in result.gpus:
        if gpu.measres != "success" or not gpu.nonce_match:
            problems.append(f"{gpu.name}: measres {gpu.measres}, nonce match {gpu.nonce_match}")
    if problems:
        return CheckResult.failed(GPU_NRAS, "NRAS: " + "; ".join(problems))
    return CheckResult.passed(
        GPU_NRAS, f"NRAS: {len(result.gpus)} GPU(s) attested, tokens signed by NVIDIA's JWKS"
    )
