"""``Verifier``: trust roots in, typed results out.

Build it with ``Verifier.production()`` (Intel's pinned SGX root and dcap-qvl's collateral
checks, NVIDIA's pinned Device Identity CA) or from roots you name, as a test does. What is
acceptable comes in as a ``VerificationPolicy``; evidence comes in as bytes or parsed JSON.

A report is judged node by node: the node that answered, then every other entry of
``all_attestations``, each on its own quote, key binding, event log, measurements and GPU evidence,
all for the one nonce. ``ok`` means: the software we expect (measurements compared), on hardware
we trust (quote and GPU chains), now (the caller's nonce) — unless the caller relaxed a part by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from tee_inference.attestation.nvidia_devices import DeviceIdentity, duplicate_devices
from tee_inference.attestation.nvidia_payload import NvidiaPayload
from tee_inference.attestation.nvidia_spdm import GpuAttestationError
from tee_inference.attestation.report import AttestationReport
from tee_inference.attestation.tdx_quote import Quote, QuoteFormatError, load_quote
from tee_inference.verify import events as ev
from tee_inference.verify import report as rp
from tee_inference.verify.collateral import fetch_collaterals_sync, report_quotes
from tee_inference.verify.gpu import check_gpu, check_nras
from tee_inference.verify.gpu_binding import check_gpu_binding
from tee_inference.verify.measurements import TDX_FIELDS, MeasuredValues
from tee_inference.verify.nvsdk import GPU_NVIDIA_SDK, NvidiaSdkBackend
from tee_inference.verify.policy import MEASUREMENTS, RELAXABLE, VerificationPolicy
from tee_inference.verify.quote import check_quote
from tee_inference.verify.results import CheckResult, Status, VerificationError, VerificationResult
from tee_inference.verify.trust import load_intel_root, production_nvidia_root


@dataclass(frozen=True)
class _Evidence:
    """What the caller hands every node's verification alongside the policy."""

    nonce: bytes
    model: str | None
    collateral: Any
    now: int | None
    nras_client: Any
    tls_layout: bool | None = None
    rims: tuple[Any, ...] = ()
    rim_client: Any = None
    ocsp_client: Any = None


@dataclass(frozen=True)
class NodeResult:
    """One node's checks and what they established about it."""

    checks: tuple[CheckResult, ...]
    simulated: bool
    attested: dict[str, Any] = field(default_factory=dict)
    identities: tuple[DeviceIdentity, ...] = ()


@dataclass(frozen=True)
class Verifier:
    """Verifies quotes and attestation reports under explicit trust roots.

    ``nvidia_sdk``, when set, adds NVIDIA's nv-attestation-sdk as an extra, required GPU check
    (``gpu_nvidia_sdk``) next to ours; it replaces none of them.
    """

    intel_root: x509.Certificate
    nvidia_root: x509.Certificate
    nvidia_sdk: NvidiaSdkBackend | None = None

    @classmethod
    def production(cls) -> Verifier:
        return cls(intel_root=load_intel_root(), nvidia_root=production_nvidia_root())

    def verify_quote(
        self,
        quote: bytes | str,
        policy: VerificationPolicy,
        *,
        event_log: Any = None,
        collateral: Any = None,
        pccs_url: str | None = None,
        now: int | None = None,
    ) -> VerificationResult:
        """A bare quote (and optionally its event log): everything but the key and GPU bindings."""
        if collateral is None and pccs_url:
            collateral = fetch_collaterals_sync(pccs_url, _raw(quote))  # pragma: no cover - network
        qc = check_quote(quote, policy, intel_root=self.intel_root, collateral=collateral, now=now)
        checks = list(qc.checks)
        attested: dict[str, Any] = {"tcb_status": qc.tcb_status}
        if qc.quote is not None:
            td = qc.quote.td_report
            checks.append(CheckResult.skipped(
                rp.REPORT_DATA, f"{td.report_data.hex()} (nothing to compare it with: use `verify report`)",
                required=False,
            ))  # fmt: skip
            events, replay = ev.check_event_log(event_log, td.rtmrs, required=event_log is not None)
            checks.append(replay)
            if events is not None:
                claims = ev.read_runtime_events(events)
                checks.append(ev.check_runtime_events(claims))
                checks.append(ev.describe_runtime_events(claims))
                checks.append(rp.check_mrconfigid(claims, td.mrconfigid))
            attested.update(_tdx_values(qc.quote))
        return VerificationResult(tuple(checks), policy.relax, qc.simulated, attested)

    def verify_report(
        self,
        report: AttestationReport | Mapping[str, Any] | str | bytes,
        policy: VerificationPolicy,
        *,
        nonce: bytes | None = None,
        model: str | None = None,
        signing_algo: str | None = None,
        tls_layout: bool | None = None,
        collateral: Any = None,
        pccs_url: str | None = None,
        now: int | None = None,
        nras_client: Any = None,
        rims: Sequence[Any] = (),
        rim_client: Any = None,
        ocsp_client: Any = None,
    ) -> VerificationResult:
        """A whole SPEC §3 report. ``nonce`` is the one you sent; ``signing_algo`` the one you asked.

        Without ``nonce`` freshness is a required skip, and without an expected file in the policy
        so are measurements: ``ok`` stays false unless the policy relaxes them by name.
        ``collateral`` is one QuoteCollateralV3 or a list, one per platform of the report's nodes
        (each quote is checked with its own platform's); ``pccs_url`` fetches one per platform.
        """
        if nonce is not None and len(nonce) != 32:
            raise VerificationError(f"a nonce is 32 bytes, got {len(nonce)}")
        parsed, fmt = _parsed(report)
        if parsed is None:
            return VerificationResult((fmt,), policy.relax)
        if collateral is None and pccs_url:
            # Every node's platform, not only the answering one's: a gateway's nodes may differ.
            collateral = fetch_collaterals_sync(pccs_url, report_quotes(parsed))  # pragma: no cover
        evidence = _Evidence(
            parsed.request_nonce if nonce is None else nonce, model, collateral, now, nras_client, tls_layout,
            tuple(rims), rim_client, ocsp_client,
        )  # fmt: skip
        checks = [fmt, rp.check_signing_algo(parsed, signing_algo), rp.check_freshness(parsed, nonce)]
        primary = self._verify_node(parsed, policy, evidence)
        checks += primary.checks
        nodes = self._other_nodes(parsed, policy, evidence, primary)
        checks.append(rp.summarize_nodes([(label, node_ok, why) for label, node_ok, why, _ in nodes[1:]]))
        attested = {
            **primary.attested,
            "nonce": evidence.nonce.hex(),
            "nodes": [
                {"node": label, "ok": node_ok, "problem": why, **facts}
                for label, node_ok, why, facts in nodes
            ],
        }
        return VerificationResult(tuple(checks), policy.relax, primary.simulated, attested)

    # -- one node ----------------------------------------------------------------------------

    def _verify_node(self, node: AttestationReport, policy: VerificationPolicy, e: _Evidence) -> NodeResult:
        qc = check_quote(
            node.intel_quote, policy, intel_root=self.intel_root, collateral=e.collateral, now=e.now
        )
        checks = [*qc.checks, rp.check_signing_key(node)]
        claims, measured = None, None
        if qc.quote is None:
            checks += [
                CheckResult.skipped(n, "quote did not parse") for n in (rp.REPORT_DATA, ev.EVENT_LOG_REPLAY)
            ]
        else:
            td = qc.quote.td_report
            checks.append(rp.check_report_data(node, td.report_data, e.nonce, tls_layout=e.tls_layout))
            events, replay = ev.check_event_log(node.event_log, td.rtmrs)
            checks.append(replay)
            if events is not None:
                claims = ev.read_runtime_events(events)
                checks.append(ev.check_runtime_events(claims))
                measured = _measured(qc.quote, claims)
            checks.append(rp.check_mrconfigid(claims, td.mrconfigid))
        checks += rp.check_runtime_claims(node, claims, e.model)
        checks.append(rp.check_tls_fingerprint(node, claims))
        checks.append(_measurements(policy, measured, claims))
        gc = check_gpu(
            node.nvidia_payload, e.nonce, policy, nvidia_root=self.nvidia_root, rims=e.rims,
            rim_client=e.rim_client, ocsp_client=e.ocsp_client, now=e.now,
        )  # fmt: skip
        checks += gc.checks
        checks.append(check_gpu_binding(claims.gpu_gate if claims is not None else None, gc.identities))
        if e.nras_client is not None and node.nvidia_payload:
            checks.append(check_nras(node.nvidia_payload, e.nonce, e.nras_client))  # pragma: no cover
        else:
            checks.append(
                CheckResult.skipped("gpu_nras", "offline: NVIDIA's NRAS not asked (--nras)", required=False)
            )
        if self.nvidia_sdk is not None:
            checks.append(_nvidia_sdk(self.nvidia_sdk, node.nvidia_payload, e.nonce))
        checks.append(rp.check_simulated(node.info, qc.simulated, gc.simulated, policy.simulated.allowed))
        bound = any(c.name == rp.REPORT_DATA and c.status is Status.PASS for c in checks)
        key_ok = any(c.name == rp.SIGNING_KEY and c.status is Status.PASS for c in checks)
        ecdsa = node.signing_algo == "ecdsa"
        attested: dict[str, Any] = {
            # Only what report_data bound (and keys derived from it): a caller that matches
            # signatures must use these, never the report's other fields.
            "signing_address": node.signing_address if bound and key_ok and ecdsa else None,
            "signing_algo": node.signing_algo,
            "signing_public_key": node.signing_public_key.hex() if bound and key_ok else None,
            "tls_cert_fingerprint": node.tls_cert_fingerprint
            if bound and _passed(checks, rp.TLS_FINGERPRINT)
            else None,
            "e2ee_public_key": (
                (claims.keyset or {}).get("e2ee_public_key")
                if bound and claims and _passed(checks, rp.KEYSET_EVENT)
                else None
            ),
            # The keyset event names the node's other signing key: with the address it bound, both
            # keys of the node are attested (a gateway checks stored records under both).
            "ed25519_public_key": (
                (claims.keyset or {}).get("ed25519_public_key")
                if bound and claims and _passed(checks, rp.KEYSET_EVENT)
                else None
            ),
            "model": node.info.get("model"),
            "tcb_status": qc.tcb_status,
            "gpus": list(gc.gpus),
            "gpu_devices": [
                {"ueid": d.ueid, "identity_key_sha256": d.identity_key_sha256} for d in gc.identities
            ],
        }
        if measured is not None:
            attested["measured"] = measured.summary()
        return NodeResult(tuple(checks), qc.simulated or gc.simulated, attested, gc.identities)

    def _other_nodes(
        self, parsed: AttestationReport, policy: VerificationPolicy, e: _Evidence, primary: NodeResult
    ) -> list[tuple[str, bool, str, dict[str, Any]]]:
        """(label, ok, first problem, attested facts) for every node of all_attestations."""
        blocking = VerificationResult(primary.checks, policy.relax).blocking
        first = f"{blocking[0].name}: {blocking[0].detail}" if blocking else ""
        out = [(f"this node ({parsed.signing_address})", not blocking, first, primary.attested)]
        quotes = {parsed.intel_quote}
        devices = [("this node", identity) for identity in primary.identities]
        self_seen = False
        for index, node in enumerate(parsed.all_attestations):
            if node.node_dict() == parsed.node_dict() and not self_seen:
                self_seen = True  # the answering node lists itself; it was verified above
                continue
            label = f"all_attestations[{index}] ({node.signing_address})"
            if node.intel_quote in quotes:
                out.append((label, False, "reuses another node's quote: it is not a node of its own", {}))
                continue
            quotes.add(node.intel_quote)
            result = self._verify_node(node, policy, e)
            mine = [(label, identity) for identity in result.identities]
            shared = [p for p in duplicate_devices([*devices, *mine]) if p.startswith(label)]
            devices += mine
            blocking = VerificationResult(result.checks, policy.relax).blocking
            problem = f"{blocking[0].name}: {blocking[0].detail}" if blocking else ""
            if shared and not problem:
                problem = f"gpu_distinct: {'; '.join(shared)}: two nodes cannot hold one GPU"
            out.append((label, not problem, problem, result.attested))
        return out


def _passed(checks: list[CheckResult], name: str) -> bool:
    return any(c.name == name and c.status is Status.PASS for c in checks)


def _parsed(
    report: AttestationReport | Mapping[str, Any] | str | bytes,
) -> tuple[AttestationReport | None, CheckResult]:
    if isinstance(report, AttestationReport):
        return report, CheckResult.passed(rp.REPORT_FORMAT, f"{report.signing_algo} report")
    if isinstance(report, str | bytes):
        try:
            report = json.loads(report)
        except ValueError as exc:
            return None, CheckResult.failed(rp.REPORT_FORMAT, f"not JSON: {exc}")
    return rp.parse_report(report)


def _tdx_values(quote: Quote) -> dict[str, str]:
    td = quote.td_report
    return {name: bytes(getattr(td, name)).hex() for name in TDX_FIELDS}


def _measured(quote: Quote, claims: ev.RuntimeClaims) -> MeasuredValues:
    def hex_of(name: str) -> str | None:
        value = claims.platform.get(name)
        return value.hex() if value is not None else None

    image = claims.image.get("image_digest") if claims.image else None
    return MeasuredValues(
        tdx=_tdx_values(quote),
        image_digest=str(image) if image is not None else None,
        compose_hash=hex_of("compose-hash"),
        os_image_hash=hex_of("os-image-hash"),
        models={name: str(m.get("root")).lower() for name, m in claims.models.items()},
    )


def _measurements(
    policy: VerificationPolicy, measured: MeasuredValues | None, claims: ev.RuntimeClaims | None
) -> CheckResult:
    if measured is None or claims is None:
        return CheckResult.skipped(MEASUREMENTS, "event log not verified: no measured values to compare")
    if claims.problems:
        return CheckResult.failed(
            MEASUREMENTS, "RTMR3 breaks the event rules (runtime_events): its claims are not read"
        )
    if policy.measurements is None:
        mrtd, image, weights = measured.tdx["mrtd"][:16], measured.image_digest, dict(measured.models)
        shown = f"mrtd {mrtd}…, image {image}, weights {weights}"
        return CheckResult.skipped(
            MEASUREMENTS,
            f"no expected-measurements file (--expect): nothing says this is the software you expect "
            f"({RELAXABLE[MEASUREMENTS]} accepts that); measured {shown}",
        )
    return policy.measurements.evaluate(measured)


def _nvidia_sdk(backend: NvidiaSdkBackend, payload_text: str | None, nonce: bytes) -> CheckResult:
    if not payload_text:
        return CheckResult.skipped(GPU_NVIDIA_SDK, "no GPU evidence to hand to nv-attestation-sdk")
    try:
        payload = NvidiaPayload.from_json(payload_text)
    except GpuAttestationError:
        return CheckResult.skipped(GPU_NVIDIA_SDK, "nvidia_payload did not parse")  # gpu_evidence fails
    return backend.verify(payload, nonce)


def _raw(quote: bytes | str) -> list[bytes]:  # pragma: no cover - only for the online collateral fetch
    """The quote to ask a PCCS about; none when it does not parse (the quote check reports it)."""
    try:
        return [load_quote(quote).raw]
    except QuoteFormatError:
        return []
