"""What is acceptable, as policy objects: TCB status, TD attributes, simulation, measurements.

Each policy answers one question with a ``CheckResult``. Measurement policies compose with
``AllOf`` and ``AnyOf`` (accept the release you reviewed *or* the one rolling out next), in the
manner of sigstore-python's identity policies; the verifier never reads loose flags.

The defaults are the strict ones, the same in the library and the CLI: ``ok`` needs measurements
compared against an expected file and freshness proved by a nonce the caller chose. A caller
relaxes either only by name (``relax={"measurements"}``, ``{"freshness"}``; in the CLI
``--no-measurements``, ``--allow-stale``), and the verdict says so.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from tee_inference.attestation.nvidia_devices import GPU_ARCHES, KNOWN_ARCHES, SWITCH_ARCHES
from tee_inference.attestation.td_attributes import TdAttributesPolicy
from tee_inference.exceptions import VerificationError
from tee_inference.verify.measurements import (
    ExpectedMeasurements,
    MeasuredValues,
    compare_measurements,
)
from tee_inference.verify.results import CheckResult, Status

MEASUREMENTS: Final = "measurements"
FRESHNESS: Final = "freshness"
TCB_STATUS: Final = "tcb_status"
# The required checks a caller may accept as skipped, and the CLI option that says so.
RELAXABLE: Final = {MEASUREMENTS: "--no-measurements", FRESHNESS: "--allow-stale",
                    TCB_STATUS: "--allow-missing-collateral", "tls_binding": "--allow-plaintext"}  # fmt: skip

# Intel's TCB statuses (TCB Info v3); only UpToDate means "no known issue".
KNOWN_TCB_STATUSES: Final = frozenset({
    "UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
    "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked",
})  # fmt: skip


@dataclass(frozen=True)
class TcbPolicy:
    """Statuses that pass outright (``accept``) and those that pass but are reported (``allow``)."""

    accept: frozenset[str] = frozenset({"UpToDate"})
    allow: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = (self.accept | self.allow) - KNOWN_TCB_STATUSES
        if unknown:
            raise VerificationError(
                f"unknown TCB status(es) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(KNOWN_TCB_STATUSES))}"
            )
        if "Revoked" in self.accept | self.allow:
            raise VerificationError("a Revoked TCB can never be accepted")

    def evaluate(self, status: str, advisory_ids: Collection[str]) -> CheckResult:
        advisories = f" (advisories: {', '.join(sorted(advisory_ids))})" if advisory_ids else ""
        if status in self.accept:
            return CheckResult.passed("tcb_status", f"{status}{advisories}")
        if status in self.allow:
            return CheckResult.passed("tcb_status", f"{status}, allowed by policy{advisories}")
        return CheckResult.failed(
            "tcb_status",
            f"{status} is not accepted (accepted: {', '.join(sorted(self.accept | self.allow))}){advisories}",
        )


@dataclass(frozen=True)
class SimulatedPolicy:
    """Whether evidence under SIMULATED roots may pass. Off unless a person asked for it."""

    allowed: bool = False


@dataclass(frozen=True)
class GpuPolicy:
    """What NVIDIA device evidence must show beyond its signatures.

    ``arches`` and ``switch_arches`` are the architectures accepted (NRAS names). Whether the
    reference-measurement (``gpu_rim``) and revocation (``gpu_ocsp``) checks must run is asked
    here: by default their skip is reported, not blocking. ``allow_ocsp_hold`` accepts a
    certificate that NVIDIA's responder reports revoked with reason ``certificateHold``.
    """

    arches: frozenset[str] = GPU_ARCHES
    switch_arches: frozenset[str] = SWITCH_ARCHES
    require_rim: bool = False
    require_ocsp: bool = False
    allow_ocsp_hold: bool = False

    def __post_init__(self) -> None:
        unknown = (self.arches | self.switch_arches) - KNOWN_ARCHES
        if unknown:
            raise VerificationError(
                f"unknown NVIDIA architecture(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(KNOWN_ARCHES))}"
            )
        if self.switch_arches - SWITCH_ARCHES or self.arches & SWITCH_ARCHES:
            raise VerificationError(
                f"GPU architectures go in 'arches', NVSwitch ones ({', '.join(sorted(SWITCH_ARCHES))}) "
                "in 'switch_arches'"
            )

    @property
    def allowed(self) -> frozenset[str]:
        return self.arches | self.switch_arches


class ClaimsPolicy(Protocol):
    """Judges measured values; ``MeasurementPolicy``, ``AllOf`` and ``AnyOf`` are the implementations."""

    def evaluate(self, measured: MeasuredValues) -> CheckResult: ...


@dataclass(frozen=True)
class MeasurementPolicy:
    """Every field the expected file constrains must hold."""

    expected: ExpectedMeasurements

    def evaluate(self, measured: MeasuredValues) -> CheckResult:
        results = compare_measurements(self.expected, measured)
        where = self.expected.origin
        if not results:
            return CheckResult.failed(
                MEASUREMENTS, f"{where} constrains no field; refusing to pass on nothing"
            )
        bad = [r for r in results if not r.ok]
        if bad:
            return CheckResult.failed(MEASUREMENTS, f"{where}: " + "; ".join(str(r) for r in bad))
        open_ = f"; NOT pinned: {', '.join(sorted(self.expected.unpinned))}" if self.expected.unpinned else ""
        return CheckResult.passed(MEASUREMENTS, f"{where}: " + ", ".join(str(r) for r in results) + open_)


@dataclass(frozen=True)
class AllOf:
    policies: tuple[ClaimsPolicy, ...]

    def __init__(self, *policies: ClaimsPolicy) -> None:
        if not policies:
            raise VerificationError("AllOf needs at least one policy")
        object.__setattr__(self, "policies", policies)

    def evaluate(self, measured: MeasuredValues) -> CheckResult:
        results = [p.evaluate(measured) for p in self.policies]
        bad = [r for r in results if r.status is not Status.PASS]
        status = Status.FAIL if bad else Status.PASS
        return CheckResult(MEASUREMENTS, status, " | ".join(r.detail for r in bad or results))


@dataclass(frozen=True)
class AnyOf:
    policies: tuple[ClaimsPolicy, ...]

    def __init__(self, *policies: ClaimsPolicy) -> None:
        if not policies:
            raise VerificationError("AnyOf needs at least one policy")
        object.__setattr__(self, "policies", policies)

    def evaluate(self, measured: MeasuredValues) -> CheckResult:
        results = [p.evaluate(measured) for p in self.policies]
        for r in results:
            if r.status is Status.PASS:
                return r
        return CheckResult.failed(
            MEASUREMENTS, "none of the expectations hold: " + " | ".join(r.detail for r in results)
        )


@dataclass(frozen=True)
class VerificationPolicy:
    """Everything a verification judges by.

    ``relax`` names required checks whose *skip* is acceptable (never a failure): the keys of
    ``RELAXABLE``. ``measurements`` None means no expected file: the ``measurements`` check is
    then a required skip, so ``ok`` stays false unless ``measurements`` is relaxed.
    """

    tcb: TcbPolicy = field(default_factory=TcbPolicy)
    simulated: SimulatedPolicy = field(default_factory=SimulatedPolicy)
    measurements: ClaimsPolicy | None = None
    relax: frozenset[str] = frozenset()
    require_gpu: bool = True
    td_attributes: TdAttributesPolicy = field(default_factory=TdAttributesPolicy)
    gpu: GpuPolicy = field(default_factory=GpuPolicy)

    def __post_init__(self) -> None:
        unknown = self.relax - RELAXABLE.keys()
        if unknown:
            raise VerificationError(
                f"cannot relax {', '.join(sorted(unknown))}; only {', '.join(sorted(RELAXABLE))} can be"
            )

    @classmethod
    def build(
        cls,
        *,
        expected: Iterable[ExpectedMeasurements] = (),
        allow_simulated: bool = False,
        allow_tcb: Iterable[str] = (),
        relax: Iterable[str] = (),
        require_gpu: bool = True,
    ) -> VerificationPolicy:
        """The common case from plain values: several expected files mean *any one of them* holds."""
        files = [MeasurementPolicy(e) for e in expected]
        measurements: ClaimsPolicy | None = None
        if len(files) == 1:
            measurements = files[0]
        elif files:
            measurements = AnyOf(*files)
        return cls(
            tcb=TcbPolicy(allow=frozenset(allow_tcb)),
            simulated=SimulatedPolicy(allowed=allow_simulated),
            measurements=measurements,
            relax=frozenset(relax),
            require_gpu=require_gpu,
        )
