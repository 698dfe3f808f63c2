"""``Verifier``: trust roots in, typed results out.

Build it with ``Verifier.production()`` (Intel's pinned SGX root and dcap-qvl's collateral
checks, NVIDIA's pinned Device Identity CA) or from roots you name, as a test does. What is
acceptable comes in as a ``VerificationPolicy``; evidence comes in as bytes or parsed JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from tee_inference.attestation.nvidia_payload import NvidiaPayload
from tee_inference.attestation.nvidia_spdm import GpuAttestationError
from tee_inference.attestation.report import AttestationReport
from tee_inference.exceptions import VerificationError
from tee_inference.verify import events as ev
from tee_inference.verify import report as rp
from tee_inference.verify.gpu import check_gpu, check_nras
from tee_inference.verify.measurements import MeasuredValues
from tee_inference.verify.nvsdk import GPU_NVIDIA_SDK, NvidiaSdkBackend
from tee_inference.verify.policy import MEASUREMENTS, VerificationPolicy
from tee_inference.verify.quote import check_quote, fetch_collateral
from tee_inference.verify.results import CheckResult, Status, VerificationResult
from tee_inference.verify.trust import load_intel_root, production_nvidia_root


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
            collateral = fetch_collateral(pccs_url, _raw(quote))  # pragma: no cover - network
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
                checks.append(
                    CheckResult.passed(
                        "runtime_events", "; ".join(claims.descriptions) or "none", required=False
                    )
                )
            attested.update(mrtd=td.mrtd.hex(), **{f"rtmr{i}": r.hex() for i, r in enumerate(td.rtmrs)})
        return VerificationResult(tuple(checks), policy.relax, qc.simulated, attested)

    def verify_report(
        self,
        report: AttestationReport | Mapping[str, Any] | str | bytes,
        policy: VerificationPolicy,
        *,
        nonce: bytes | None = None,
        model: str | None = None,
        collateral: Any = None,
        pccs_url: str | None = None,
        now: int | None = None,
        nras_client: Any = None,
        _nested: bool = False,
    ) -> VerificationResult:
        """A whole SPEC §3 report. ``nonce`` is the one you sent; without it freshness is not shown."""
        if nonce is not None and len(nonce) != 32:
            raise VerificationError(f"a nonce is 32 bytes, got {len(nonce)}")
        if isinstance(report, str | bytes):
            try:
                report = json.loads(report)
            except ValueError as exc:
                return VerificationResult(
                    (CheckResult.failed(rp.REPORT_FORMAT, f"not JSON: {exc}"),), policy.relax
                )
        if isinstance(report, AttestationReport):
            parsed, fmt = report, CheckResult.passed(rp.REPORT_FORMAT, f"{report.signing_algo} node report")
        else:
            parsed_or_none, fmt = rp.parse_report(report)
            if parsed_or_none is None:
                return VerificationResult((fmt,), policy.relax)
            parsed = parsed_or_none
        expected_nonce = parsed.request_nonce if nonce is None else nonce
        if collateral is None and pccs_url:
            collateral = fetch_collateral(pccs_url, _raw(parsed.intel_quote))  # pragma: no cover - network
        qc = check_quote(
            parsed.intel_quote, policy, intel_root=self.intel_root, collateral=collateral, now=now
        )
        checks = [fmt, rp.check_freshness(parsed, nonce), *qc.checks, rp.check_signing_key(parsed)]
        claims = None
        measured = None
        if qc.quote is None:
            checks.append(CheckResult.skipped(rp.REPORT_DATA, "quote did not parse"))
            checks.append(CheckResult.skipped(ev.EVENT_LOG_REPLAY, "quote did not parse"))
        else:
            td = qc.quote.td_report
            checks.append(rp.check_report_data(parsed, td.report_data, expected_nonce))
            events, replay = ev.check_event_log(parsed.event_log, td.rtmrs)
            checks.append(replay)
            if events is not None:
                claims = ev.read_runtime_events(events)
                measured = MeasuredValues(
                    mrtd=td.mrtd.hex(), rtmr0=td.rtmr0.hex(), rtmr1=td.rtmr1.hex(), rtmr2=td.rtmr2.hex(),
                    image_digest=str(claims.images[-1].get("image_digest")) if claims.images else None,
                    compose_hash=claims.dstack.get("compose-hash"),
                    os_image_hash=claims.dstack.get("os-image-hash"),
                    models={str(m.get("model")): str(m.get("root")).lower() for m in claims.models},
                )  # fmt: skip
        checks += rp.check_runtime_claims(parsed, claims, model)
        checks.append(_measurements(policy, measured))
        gc = check_gpu(parsed.nvidia_payload, expected_nonce, policy, nvidia_root=self.nvidia_root)
        checks += gc.checks
        if nras_client is not None and parsed.nvidia_payload:
            checks.append(check_nras(parsed.nvidia_payload, expected_nonce, nras_client))  # pragma: no cover
        else:
            checks.append(
                CheckResult.skipped("gpu_nras", "offline: NVIDIA's NRAS not asked (--nras)", required=False)
            )
        if self.nvidia_sdk is not None:
            checks.append(_nvidia_sdk(self.nvidia_sdk, parsed.nvidia_payload, expected_nonce))
        simulated = qc.simulated or gc.simulated
        checks.append(rp.check_simulated(parsed.info, qc.simulated, gc.simulated, policy.simulated.allowed))
        if not _nested:
            checks.append(self._other_nodes(parsed, policy, expected_nonce, model, collateral, now))
        report_data_ok = any(c.name == rp.REPORT_DATA and c.status is Status.PASS for c in checks)
        attested: dict[str, Any] = {
            # Only what report_data bound: a caller matching signatures must use this, not the claim.
            "signing_address": parsed.signing_address if report_data_ok else None,
            "signing_algo": parsed.signing_algo,
            "signing_public_key": parsed.signing_public_key.hex() if report_data_ok else None,
            "nonce": expected_nonce.hex(),
            "model": parsed.info.get("model"),
            "tcb_status": qc.tcb_status,
            "gpus": list(gc.gpus),
        }
        if measured is not None:
            attested["measured"] = {k: v for k, v in vars(measured).items() if v}
        return VerificationResult(tuple(checks), policy.relax, simulated, attested)

    def _other_nodes(
        self, parsed: AttestationReport, policy: VerificationPolicy, nonce: bytes,
        model: str | None, collateral: Any, now: int | None,
    ) -> CheckResult:  # fmt: skip
        results = []
        for index, node in enumerate(parsed.all_attestations):
            if node.intel_quote == parsed.intel_quote:
                continue  # this node itself
            sub = self.verify_report(
                node, policy, nonce=nonce, model=model, collateral=collateral, now=now, _nested=True
            )
            first = sub.blocking[0] if sub.blocking else None
            label = f"node {index} ({node.signing_address})"
            results.append((label, sub.ok, f"{first.name}: {first.detail}" if first else ""))
        return rp.summarize_nodes(results)


def _measurements(policy: VerificationPolicy, measured: MeasuredValues | None) -> CheckResult:
    if measured is None:
        return CheckResult.skipped(MEASUREMENTS, "event log not verified: no measured values to compare")
    if policy.measurements is None:
        shown = f"mrtd {measured.mrtd[:16]}…, image {measured.image_digest}, weights {dict(measured.models)}"
        return CheckResult.skipped(
            MEASUREMENTS, f"no expected-measurements file (--expect); measured {shown}", required=False
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


def _raw(quote: bytes | str) -> bytes:  # pragma: no cover - only for the online collateral fetch
    from tee_inference.attestation.tdx_quote import load_quote

    return load_quote(quote).raw
