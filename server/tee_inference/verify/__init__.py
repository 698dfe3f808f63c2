"""Verifier for gateways and auditors: quotes, event logs, GPU evidence, reports, signatures.

Importable without the server's dependencies (no FastAPI, uvicorn or vLLM)::

    from tee_inference.verify import Verifier, VerificationPolicy

    verifier = Verifier.production()
    result = verifier.verify_report(report_json, VerificationPolicy.build(expected=[expected]), nonce=nonce)
    if not result.ok:
        ...  # result.blocking says which checks failed or were skipped
"""

from tee_inference.exceptions import VerificationError
from tee_inference.verify.collateral import load_collateral, parse_collateral
from tee_inference.verify.measurements import (
    FORMAT as MEASUREMENTS_FORMAT,
)
from tee_inference.verify.measurements import (
    ExpectedMeasurements,
    FieldComparison,
    MeasuredValues,
    MeasurementsFormatError,
    compare_measurements,
    load_expected_measurements,
    parse_expected_measurements,
)
from tee_inference.verify.policy import (
    AllOf,
    AnyOf,
    ClaimsPolicy,
    MeasurementPolicy,
    SimulatedPolicy,
    TcbPolicy,
    VerificationPolicy,
)
from tee_inference.verify.results import CheckResult, Status, VerificationResult
from tee_inference.verify.signature import verify_signature
from tee_inference.verify.trust import INTEL_SGX_ROOT_CA_SHA256, load_intel_root
from tee_inference.verify.verifier import Verifier

__all__ = [
    "INTEL_SGX_ROOT_CA_SHA256",
    "MEASUREMENTS_FORMAT",
    "AllOf",
    "AnyOf",
    "CheckResult",
    "ClaimsPolicy",
    "ExpectedMeasurements",
    "FieldComparison",
    "MeasuredValues",
    "MeasurementPolicy",
    "MeasurementsFormatError",
    "SimulatedPolicy",
    "Status",
    "TcbPolicy",
    "VerificationError",
    "VerificationPolicy",
    "VerificationResult",
    "Verifier",
    "compare_measurements",
    "load_collateral",
    "load_expected_measurements",
    "load_intel_root",
    "parse_collateral",
    "parse_expected_measurements",
    "verify_signature",
]
