"""GPU evidence checks on an NRAS-form ``nvidia_payload``: chains, signatures, nonce, devices, RIMs.

Offline, each device's certificate chain must lead to NVIDIA's pinned Device Identity CA, the
SPDM report must be signed by the chain's leaf, the leaf's FWID must equal the report's, and
the request nonce inside the signed report must be the expected one (``gpu_chain``,
``gpu_evidence``, ``gpu_nonce``). Across the payload, no device may appear twice
(``gpu_distinct``), every ``arch`` must be allowed and match its chain (``gpu_arch``), and
NVSwitches must wire up with the GPUs as on an HGX board (``gpu_topology``). Given RIMs, or a
RIM-service client, the measurements are compared with NVIDIA's reference values
(``gpu_rim``); given an OCSP client, no certificate may be revoked (``gpu_ocsp``). Asking NRAS
(``gpu_nras``) is online and optional.

NVSwitch evidence travels in the same ``evidence_list`` as the GPUs', each entry marked
``"arch": "LS10"`` (its chain is ``LS_10 … FSP``); the payload's ``arch`` stays the GPUs'::

    {"nonce": hex, "arch": "HOPPER", "evidence_list": [
        {"evidence": b64, "certificate": b64, "arch": "HOPPER"}, …          8 GPUs
        {"evidence": b64, "certificate": b64, "arch": "LS10"}, …]}          4 NVSwitches
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from cryptography import x509

from tee_inference.attestation.nvidia_certs import certificate_fwid, verify_certificate_chain
from tee_inference.attestation.nvidia_devices import SWITCH_ARCHES, DeviceIdentity
from tee_inference.attestation.nvidia_nras import parse_nras_response, verify_nras_jwt
from tee_inference.attestation.nvidia_payload import GpuEvidenceEntry, NvidiaPayload
from tee_inference.attestation.nvidia_rim import HttpClient, load_rim_root
from tee_inference.attestation.nvidia_spdm import (
    OPAQUE_FIELD_FWID,
    GpuAttestationError,
    GpuNonceMismatchError,
    verify_evidence_nonce,
    verify_evidence_signature,
)
from tee_inference.exceptions import VerificationError
from tee_inference.verify.gpu_devices import (
    GPU_ARCH,
    GPU_DISTINCT,
    GPU_TOPOLOGY,
    Device,
    check_arch,
    check_distinct,
    check_topology,
)
from tee_inference.verify.gpu_reference import (
    GPU_OCSP,
    GPU_RIM,
    RimSource,
    check_ocsp,
    check_rims,
    load_rims,
)
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.results import CheckResult
from tee_inference.verify.trust import fingerprint, names_simulated, subject

GPU_CHAIN, GPU_EVIDENCE, GPU_NONCE, GPU_NRAS = "gpu_chain", "gpu_evidence", "gpu_nonce", "gpu_nras"
NRAS_URL: Final = "https://nras.attestation.nvidia.com/v3/attest/gpu"
NRAS_JWKS_URL: Final = "https://nras.attestation.nvidia.com/.well-known/jwks.json"
_DEVICE_CHECKS: Final = (GPU_DISTINCT, GPU_ARCH, GPU_TOPOLOGY, GPU_RIM, GPU_OCSP)


@dataclass(frozen=True)
class GpuChecks:
    """The checks, and what they established about the devices.

    ``devices`` has one line per entry that carried a chain, naming the device (NVIDIA's
    ``ueid`` and the BROM identity key); two equal lines, in this report or across the nodes of
    one, are one device. ``identities`` are the same as values, for
    :func:`tee_inference.attestation.nvidia_devices.duplicate_devices`.
    """

    checks: tuple[CheckResult, ...]
    simulated: bool
    gpus: tuple[str, ...] = ()  # one line per device: driver and VBIOS versions
    devices: tuple[str, ...] = ()
    identities: tuple[DeviceIdentity, ...] = ()


def _skip_all(reason: str, *, required: bool = True) -> tuple[CheckResult, ...]:
    return tuple(
        CheckResult.skipped(n, reason, required=required) for n in (GPU_CHAIN, GPU_EVIDENCE, GPU_NONCE)
    )


def _skip_device_checks(reason: str) -> tuple[CheckResult, ...]:
    return tuple(CheckResult.skipped(n, reason, required=False) for n in _DEVICE_CHECKS)


def _instant(now: datetime | int | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if isinstance(now, int):
        return datetime.fromtimestamp(now, UTC)
    if now.tzinfo is None:
        raise VerificationError("'now' must be timezone-aware")
    return now


@dataclass
class _Findings:
    """Problems per check, gathered while each entry is examined."""

    chain: list[str]
    evidence: list[str]
    nonce: list[str]
    anchors: set[str]
    simulated: bool = False


def _examine(
    index: int, entry: GpuEvidenceEntry, nonce: bytes, policy: VerificationPolicy,
    nvidia_root: x509.Certificate, found: _Findings,
) -> Device:  # fmt: skip
    """Chain, report, nonce, signature and FWID of one entry; problems go into ``found``."""
    decoded: tuple[x509.Certificate, ...] = ()
    anchor: x509.Certificate | None = None
    try:
        decoded = tuple(entry.certificates())
    except GpuAttestationError as exc:
        found.chain.append(f"{Device(index, entry).label}: {exc}")
    where = Device(index, entry, decoded).label  # "NVSwitch n" once the chain or arch says so
    certs = decoded
    try:
        root = certs[-1] if certs else None
        anchor = nvidia_root
        if root is not None and names_simulated(root):
            found.simulated = True
            if not policy.simulated.allowed:
                found.chain.append(
                    f"{where}: chain ends at {subject(root)!r}, a simulator; pass --allow-simulated "
                    "to accept simulated evidence for testing"
                )
                certs, anchor = (), None
            else:
                anchor = root
        if certs and anchor is not None:
            verify_certificate_chain(certs, anchor)
            found.anchors.add(f"{subject(anchor)} (sha256 {fingerprint(anchor)[:16]}…)")
    except GpuAttestationError as exc:
        found.chain.append(f"{where}: {exc}")
        certs, anchor = (), None
    device = Device(index, entry, decoded, anchor if certs else None)
    try:
        evidence = entry.parse()
    except GpuAttestationError as exc:
        found.evidence.append(f"{where}: {exc}")
        return device
    try:
        verify_evidence_nonce(evidence, nonce)
    except GpuNonceMismatchError as exc:
        found.nonce.append(f"{where}: {exc}")
    if not certs:
        found.evidence.append(f"{where}: evidence signature not checked (no trusted chain)")
        return Device(index, entry, decoded, None, evidence)
    try:
        verify_evidence_signature(evidence, certs[0])
    except GpuAttestationError as exc:
        found.evidence.append(f"{where}: {exc}")
        return Device(index, entry, decoded, anchor, evidence)
    fwid, leaf_fwid = evidence.opaque_field(OPAQUE_FIELD_FWID), certificate_fwid(certs[0])
    if fwid is not None and leaf_fwid is not None and fwid != leaf_fwid:
        found.evidence.append(
            f"{where}: report FWID {fwid.hex()[:16]}… differs from the leaf's {leaf_fwid.hex()[:16]}…"
        )
        return Device(index, entry, decoded, anchor, evidence)
    return Device(index, entry, decoded, anchor, evidence, signed=True)


def _versions(device: Device) -> str | None:
    if device.evidence is None:
        return None
    if device.evidence.driver_version is None:
        return f"{device.label}: VBIOS {device.evidence.vbios_version}"
    return f"{device.label}: driver {device.evidence.driver_version}, VBIOS {device.evidence.vbios_version}"


def check_gpu(
    payload_text: str | None,
    nonce: bytes,
    policy: VerificationPolicy,
    *,
    nvidia_root: x509.Certificate,
    rims: Sequence[RimSource] = (),
    rim_client: HttpClient | None = None,
    ocsp_client: HttpClient | None = None,
    now: datetime | int | None = None,
    rim_root: x509.Certificate | None = None,
) -> GpuChecks:
    """Check every device in the payload against ``nonce``; a missing payload fails when GPUs are required.

    ``rims`` are RIM files (paths) or their bytes; ``rim_client`` and ``ocsp_client`` are
    ``httpx.Client``-like objects for NVIDIA's RIM service and OCSP responder, passed in only
    when the caller wants those online checks. ``now`` (aware datetime or epoch seconds, default
    the current time) is when RIM signatures and OCSP answers must be valid; ``rim_root``
    replaces NVIDIA's pinned CoRIM root. Raises ``VerificationError`` only for unusable RIM files.
    """
    at = _instant(now)
    given = load_rims(rims)  # the caller's own files: unusable ones are the caller's error
    if not payload_text:
        if policy.require_gpu:
            return GpuChecks((
                CheckResult.failed(GPU_EVIDENCE, "the report carries no GPU evidence"),
                *_skip_device_checks("no GPU evidence"),
            ), False)  # fmt: skip
        reason = "no GPU evidence, and the policy does not require a GPU"
        return GpuChecks((*_skip_all(reason, required=False), *_skip_device_checks(reason)), False)
    try:
        payload = NvidiaPayload.from_json(payload_text)
    except GpuAttestationError as exc:
        skip = "nvidia_payload did not parse"
        return GpuChecks((
            CheckResult.skipped(GPU_CHAIN, skip), CheckResult.failed(GPU_EVIDENCE, str(exc)),
            CheckResult.skipped(GPU_NONCE, skip), *_skip_device_checks(skip),
        ), False)  # fmt: skip
    found = _Findings([], [], [], set())
    if payload.nonce != nonce:
        found.nonce.append(f"payload nonce is {payload.nonce.hex()}, expected {nonce.hex()}")
    devices = [_examine(i, e, nonce, policy, nvidia_root, found) for i, e in enumerate(payload.entries)]
    gpus = tuple(line for line in map(_versions, devices) if line)
    kind = "device(s)" if any(d.is_switch for d in devices) else "GPU(s)"
    count = f"{len(payload.entries)} {kind}"
    root: Callable[[], x509.Certificate] = (lambda: rim_root) if rim_root is not None else load_rim_root
    rim = check_rims(devices, policy, rims=given, client=rim_client, root=root, at=at)
    checks = (
        CheckResult.failed(GPU_CHAIN, "; ".join(found.chain)) if found.chain
        else CheckResult.passed(GPU_CHAIN, f"{count}: chain to {', '.join(sorted(found.anchors))}"),
        CheckResult.failed(GPU_EVIDENCE, "; ".join(found.evidence)) if found.evidence
        else CheckResult.passed(GPU_EVIDENCE, f"{count}: SPDM report signed by its leaf; " + "; ".join(gpus)),
        CheckResult.failed(GPU_NONCE, "; ".join(found.nonce)) if found.nonce
        else CheckResult.passed(GPU_NONCE, f"{count}: every report was requested with nonce {nonce.hex()}"),
        check_distinct(devices),
        check_arch(payload, devices, policy.gpu),
        check_topology(devices),
        rim.check,
        check_ocsp(devices, rim.used, policy, client=ocsp_client, at=at),
    )  # fmt: skip
    identities = tuple(i for i in (d.identity for d in devices) if i is not None)
    return GpuChecks(
        checks, found.simulated or rim.simulated, gpus, tuple(str(i) for i in identities), identities
    )


def check_nras(payload_text: str, nonce: bytes, client: Any) -> CheckResult:  # pragma: no cover - network
    """Ask NVIDIA's NRAS about the payload's GPUs and check its tokens with NVIDIA's published keys.

    ``client`` is an ``httpx.Client``; it is passed in so that nothing here opens a connection
    unless the caller asked for the online check. NVSwitch entries are left out: NRAS attests
    them at another endpoint, which this check does not ask.
    """
    try:
        payload = NvidiaPayload.from_json(payload_text)
        gpu_entries = tuple(e for e in payload.entries if e.arch not in SWITCH_ARCHES)
        if len(gpu_entries) != len(payload.entries):
            payload_text = NvidiaPayload(payload.nonce, gpu_entries, payload.arch).to_json()
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
