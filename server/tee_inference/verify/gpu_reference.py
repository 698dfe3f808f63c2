"""GPU checks that need more than the report: reference measurements (RIMs) and revocation (OCSP).

``gpu_rim`` runs when RIMs are given (files or bytes, offline) or a RIM-service client is
passed in. For each device whose report verified, it picks the RIMs that name the versions the
signed report states (the driver RIM and the VBIOS RIM of a GPU, the VBIOS RIM of an
NVSwitch) and that are for the chip its chain names; a given RIM comes first, the RIM service
(``…/v1/rim/<NVIDIA's RIM id>``) second. Each RIM must verify under NVIDIA's pinned CoRIM root
at the time asked, then the report's measurements must be the RIMs'.

``gpu_ocsp`` runs only with an OCSP client. It asks NVIDIA's responder about each trusted
device chain from index 1 and each RIM chain used from index 0 (see
:mod:`tee_inference.attestation.nvidia_ocsp`). Nothing here opens a connection: the clients
are ``httpx.Client``-like objects the caller made.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tee_inference.attestation.nvidia_devices import chain_chip
from tee_inference.attestation.nvidia_ocsp import NVIDIA_OCSP_URL, OcspError, ask_ocsp, revocation_targets
from tee_inference.attestation.nvidia_rim import (
    HttpClient,
    Rim,
    RimError,
    compare_rims,
    driver_rim_id,
    fetch_rim,
    parse_rim,
    vbios_rim_id,
    verify_rim,
)
from tee_inference.attestation.nvidia_spdm import GpuEvidence
from tee_inference.exceptions import VerificationError
from tee_inference.verify.gpu_devices import Device
from tee_inference.verify.policy import VerificationPolicy
from tee_inference.verify.results import CheckResult
from tee_inference.verify.trust import names_simulated, subject

GPU_RIM, GPU_OCSP = "gpu_rim", "gpu_ocsp"
RimSource = bytes | str | os.PathLike[str]
_OFFLINE_RIM: Final = "no RIMs given (offline): measurements not compared with NVIDIA's reference values"
_OFFLINE_OCSP: Final = "offline: certificate revocation not asked (no OCSP client)"


@dataclass(frozen=True)
class GivenRim:
    """A RIM the caller handed in: where it came from, its bytes, its (not yet trusted) content."""

    name: str
    xml: bytes
    content: Rim


@dataclass(frozen=True)
class UsedRim:
    """A RIM that verified and matched a device: its chain is asked about by ``gpu_ocsp``."""

    label: str
    rim: Rim
    anchor: x509.Certificate


@dataclass(frozen=True)
class RimOutcome:
    check: CheckResult
    used: tuple[UsedRim, ...] = ()
    simulated: bool = False


def load_rims(items: Iterable[RimSource]) -> tuple[GivenRim, ...]:
    """Read the RIMs a caller gave (paths or XML bytes); ``VerificationError`` when one is unusable."""
    loaded = []
    for number, item in enumerate(items):
        name = f"RIM {number}" if isinstance(item, bytes) else str(item)
        try:
            xml = item if isinstance(item, bytes) else Path(item).read_bytes()
            loaded.append(GivenRim(name, xml, parse_rim(xml)))
        except (OSError, RimError) as exc:
            raise VerificationError(f"{name}: {exc}") from None
    return tuple(loaded)


def _same_chip(product: str, chip: str) -> bool:
    return product.replace("_", "").upper() == chip.replace("_", "").upper()


class _RimJudge:
    """Verifies each RIM once, under the pinned root or, when allowed, its own SIMULATED one."""

    def __init__(
        self, policy: VerificationPolicy, root: Callable[[], x509.Certificate], at: datetime
    ) -> None:
        self._policy, self._root, self._at = policy, root, at
        self._done: dict[bytes, tuple[Rim, x509.Certificate] | str] = {}
        self.simulated = False

    def verify(self, xml: bytes) -> tuple[Rim, x509.Certificate] | str:
        if xml not in self._done:
            self._done[xml] = self._verify(xml)
        return self._done[xml]

    def _verify(self, xml: bytes) -> tuple[Rim, x509.Certificate] | str:
        try:
            certs = parse_rim(xml).certificates
            anchor = self._root()
            if certs and names_simulated(certs[-1]):
                if not self._policy.simulated.allowed:
                    return f"signed under {subject(certs[-1])!r}, a simulator; pass --allow-simulated"
                anchor, self.simulated = certs[-1], True
            return verify_rim(xml, anchor, at=self._at), anchor
        except RimError as exc:
            return str(exc)


@dataclass(frozen=True)
class _Wanted:
    """One RIM a device needs: which kind, for which version, under NVIDIA's id."""

    kind: str  # "driver", "VBIOS" or "NVSwitch VBIOS"
    edition: str  # the RIM's Meta edition: "GPU" or "SWITCH"
    version: str
    rim_id: str


def _wanted(device: Device, evidence: GpuEvidence) -> list[_Wanted]:
    vbios_id = vbios_rim_id(evidence, switch=device.is_switch)
    if device.is_switch:  # a switch has firmware but no driver
        return [_Wanted("NVSwitch VBIOS", "SWITCH", evidence.vbios_version, vbios_id)]
    wanted = [_Wanted("VBIOS", "GPU", evidence.vbios_version, vbios_id)]
    driver_id = driver_rim_id(evidence, chain_chip(device.certificates) or "")
    if driver_id is not None and evidence.driver_version is not None:
        wanted.append(_Wanted("driver", "GPU", evidence.driver_version, driver_id))
    return wanted


def _candidates(
    want: _Wanted, chip: str, given: Sequence[GivenRim], client: HttpClient | None
) -> tuple[list[tuple[str, bytes]], str | None]:
    """The given RIMs that name this version and chip, else the RIM service's; or why there are none."""
    found = [
        (g.name, g.xml) for g in given
        if g.content.colloquial_version.upper() == want.version.upper()
        and g.content.edition.upper() == want.edition and _same_chip(g.content.product, chip)
    ]  # fmt: skip
    if found:
        return found, None
    if client is None:
        return [], (
            f"no {want.kind} RIM for {want.version} among the {len(given)} given (NVIDIA's id {want.rim_id})"
        )
    try:
        return [(want.rim_id, fetch_rim(client, want.rim_id))], None
    except RimError as exc:
        return [], f"{want.kind} RIM: {exc}"
    except Exception as exc:  # httpx errors: reported, never raised past the verdict
        return [], f"{want.kind} RIM {want.rim_id}: request failed: {type(exc).__name__}: {exc}"


def _device_rims(
    device: Device, given: Sequence[GivenRim], client: HttpClient | None, judge: _RimJudge
) -> tuple[list[str], list[UsedRim]]:
    """Problems, or the RIMs that verified and match, for one device."""
    evidence = device.evidence
    if evidence is None or not device.signed:
        return [f"{device.label}: report not verified, so not compared"], []
    # For each wanted RIM, every candidate that verifies (NVIDIA's samples show one version
    # signed twice with different values, so a candidate that verifies may still not match).
    options: list[list[UsedRim]] = []
    for want in _wanted(device, evidence):
        found, missing = _candidates(want, chain_chip(device.certificates) or "", given, client)
        if missing:
            return [f"{device.label}: {missing}"], []
        usable, errors = [], []
        for name, xml in found:
            result = judge.verify(xml)
            if isinstance(result, str):
                errors.append(f"{name}: {result}")
            else:
                usable.append(UsedRim(f"{device.label} {want.rim_id}", *result))
        if not usable:
            return [f"{device.label}: {'; '.join(errors)}"], []
        options.append(usable)
    vbioses, drivers = options[0], options[1] if len(options) > 1 else [None]
    first_problems: list[str] = []
    for vbios in vbioses:
        for driver in drivers:
            problems = compare_rims(evidence, vbios.rim, driver.rim if driver else None)
            if not problems:
                return [], [vbios, *([driver] if driver else [])]
            first_problems = first_problems or problems
    return [f"{device.label}: {'; '.join(first_problems)}"], []


def check_rims(
    devices: Sequence[Device],
    policy: VerificationPolicy,
    *,
    rims: Sequence[GivenRim],
    client: HttpClient | None,
    root: Callable[[], x509.Certificate],
    at: datetime,
) -> RimOutcome:
    """``gpu_rim``: every verified device's measurements are those its RIMs state."""
    if not rims and client is None:
        return RimOutcome(CheckResult.skipped(GPU_RIM, _OFFLINE_RIM, required=policy.gpu.require_rim))
    judge = _RimJudge(policy, root, at)
    problems: list[str] = []
    used: list[UsedRim] = []
    for device in devices:
        found, matched = _device_rims(device, rims, client, judge)
        problems += found
        used += matched
    if problems:
        return RimOutcome(CheckResult.failed(GPU_RIM, "; ".join(problems)), (), judge.simulated)
    expiry = min(c.not_valid_after_utc for u in used for c in u.rim.certificates)
    detail = (
        f"{len(devices)} device(s) match their RIMs ({', '.join(u.label for u in used)}); "
        f"RIM signatures checked at {at.isoformat()}, first signing certificate expires {expiry.date()}"
    )
    return RimOutcome(CheckResult.passed(GPU_RIM, detail), tuple(used), judge.simulated)


def _ask(
    client: HttpClient, cert: x509.Certificate, issuer: x509.Certificate, anchor: x509.Certificate,
    chain: Sequence[x509.Certificate], at: datetime, allow_hold: bool,
) -> tuple[str, bool]:  # fmt: skip
    try:
        status = ask_ocsp(client, cert, issuer, root=anchor, at=at, chain=chain, allow_hold=allow_hold)
    except OcspError as exc:
        return str(exc), True
    except Exception as exc:  # httpx errors: reported, never raised past the verdict
        return f"OCSP request failed: {type(exc).__name__}: {exc}", True
    return status.status, False


def check_ocsp(
    devices: Sequence[Device],
    used: Sequence[UsedRim],
    policy: VerificationPolicy,
    *,
    client: HttpClient | None,
    at: datetime,
) -> CheckResult:
    """``gpu_ocsp``: no certificate of a trusted device chain or of a RIM used is revoked."""
    if client is None:
        return CheckResult.skipped(GPU_OCSP, _OFFLINE_OCSP, required=policy.gpu.require_ocsp)
    problems = [f"{d.label}: chain not trusted, revocation not asked" for d in devices if d.anchor is None]
    targets = [
        (d.label, chain, d.anchor, target)
        for d in devices if d.anchor is not None
        for chain in [d.certificates] for target in revocation_targets(chain, d.anchor, first=1)
    ] + [
        (u.label, u.rim.certificates, u.anchor, target)
        for u in used for target in revocation_targets(u.rim.certificates, u.anchor, first=0)
    ]  # fmt: skip
    answered: dict[bytes, tuple[str, bool]] = {}  # (status or problem, is a problem); asked once each
    notes = set()
    for label, chain, anchor, (position, cert, issuer) in targets:
        key = cert.fingerprint(hashes.SHA256())
        if key not in answered:
            answered[key] = _ask(client, cert, issuer, anchor, chain, at, policy.gpu.allow_ocsp_hold)
        text, bad = answered[key]
        where = f"{label} certificate {position} ({subject(cert)})"
        if bad:
            problems.append(f"{where}: {text}")
        elif text != "good":
            notes.add(f"{where} {text}")
    if problems:
        return CheckResult.failed(GPU_OCSP, "; ".join(dict.fromkeys(problems)))
    held = f"; {'; '.join(sorted(notes))}" if notes else ""
    return CheckResult.passed(
        GPU_OCSP, f"{len(answered)} certificate(s) not revoked according to {NVIDIA_OCSP_URL}{held}"
    )
