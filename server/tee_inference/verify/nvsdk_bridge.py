# mypy: ignore-errors
"""Runs INSIDE build/nvsdk-venv: NVIDIA's local GPU verifier on evidence taken elsewhere.

This file is executed by path with the SDK venv's python (tee-inference is not installed
there, and the SDK's pinned cryptography/PyJWT/pyOpenSSL conflict with ours), so it imports
only the standard library and the SDK. Protocol, one shot:

    stdin   {"nonce": "<64 hex>", "evidence_list": [{"certificate": b64(PEM chain),
             "evidence": b64(raw SPDM report), "arch": "HOPPER"}, ...], "mode": "local",
             "network_timeout_s": 5}
    stdout  {"ok": bool, "claims": {"GPU-0": {...}}, "error": str | null,
             "unreachable": bool, "steps": {"GPU-0": {"<step>": true|false|null}},
             "log": ["<the SDK's own progress messages>", ...]}

``mode`` "local" is what ``nv_attestation_sdk.gpu.attest_gpu_local.attest`` does: the SDK's
own parser, pinned root, chain and FWID check, OCSP, nonce, signature, then the RIMs from
NVIDIA's RIM service and the measurement comparison. Every network call is bounded by
``network_timeout_s`` so an unreachable service is an answer, not a hang.
"""

import base64
import json
import logging
import os
import socket
import sys
import tempfile
from urllib.error import URLError

# Run by path, python puts this file's folder first on sys.path, where our own verifier.py would
# shadow the SDK's `verifier` package; the caller also passes -I, which leaves it out.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

MODES = ("local",)
# The SDK's own claim names (claims version 3.0) in the order the verifier reaches them; the
# last one that is true says how far it got.
STEP_CLAIMS = (
    "x-nvidia-gpu-arch-check",
    "x-nvidia-gpu-attestation-report-parsed",
    "x-nvidia-gpu-attestation-report-cert-chain-fwid-match",
    "x-nvidia-gpu-attestation-report-nonce-match",
    "x-nvidia-gpu-attestation-report-signature-verified",
    "x-nvidia-gpu-driver-rim-fetched",
    "x-nvidia-gpu-driver-rim-signature-verified",
    "x-nvidia-gpu-vbios-rim-fetched",
    "x-nvidia-gpu-vbios-rim-signature-verified",
    "measres",
)


class _Errors(logging.Handler):
    """Keeps the SDK's log: ``cc_admin.attest`` swallows its exception and only logs it."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.log = []
        self.messages = []
        self.exceptions = []

    def emit(self, record):
        if record.exc_info and record.exc_info[1] is not None:
            self.exceptions.append(record.exc_info[1])
        message = " ".join(record.getMessage().split())
        self.log.append(message)
        if record.levelno >= logging.ERROR:
            self.messages.append(message)


class _RemoteEvidence:
    """The evidence object ``cc_admin.attest`` expects (NvmlHandler's interface), from a payload.

    There is no live GPU here, so the driver and VBIOS versions come from the signed report
    itself (as with NRAS): the SDK's "version matches the driver" checks are then tautological,
    and the RIM and measurement checks are what judge those versions.
    """

    def __init__(self, index, arch, report, chain):
        self._index, self._arch, self._report, self._chain = index, arch, report, chain
        from verifier.attestation import AttestationReport
        from verifier.config import GPU_ARCHITECTURE_MAP
        from verifier.utils import format_vbios_version

        parsed = AttestationReport(report, GPU_ARCHITECTURE_MAP[arch])
        opaque = parsed.get_response_message().get_opaque_data()
        self._driver = opaque.get_data("OPAQUE_FIELD_ID_DRIVER_VERSION").decode().rstrip("\0")
        self._vbios = format_vbios_version(opaque.get_data("OPAQUE_FIELD_ID_VBIOS_VERSION")).lower()

    def get_gpu_architecture(self):
        return self._arch

    def get_uuid(self):
        return f"GPU-{self._index}"  # not in the evidence; only a label in the claims

    def get_driver_version(self):
        return self._driver

    def get_vbios_version(self):
        return self._vbios

    def get_attestation_report(self):
        return self._report

    def get_attestation_cert_chain(self):
        return self._chain


def _jwt_payload(token):
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def _is_network(exc):
    """True when the chain of causes shows the SDK could not reach one of NVIDIA's services."""
    while exc is not None:
        text = str(exc)
        if isinstance(exc, URLError | TimeoutError | ConnectionError | socket.gaierror):
            return True
        if "timed out" in text or "OCSP request failed" in text:
            return True
        if type(exc).__name__ == "RIMFetchError":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def verify(request):
    mode = request.get("mode", "local")
    if mode not in MODES:
        return {"ok": False, "claims": {}, "steps": {}, "unreachable": False,
                "error": f"unknown mode {mode!r}; known: {', '.join(MODES)}"}  # fmt: skip
    timeout = float(request.get("network_timeout_s", 5))
    # urllib inside the SDK has no timeout of its own; its thread wrapper gives up after
    # MAX_*_TIME_DELAY but leaves the socket waiting, so bound both.
    socket.setdefaulttimeout(timeout)

    from verifier import cc_admin
    from verifier.config import GPU_ARCHITECTURE_MAP, BaseSettings, event_log, info_log
    from verifier.nvml import NvmlHandler
    from verifier.nvml.gpu_cert_chains import GpuCertificateChains
    from verifier.nvml.test_handle import TestHandle

    BaseSettings.MAX_OCSP_TIME_DELAY = timeout
    BaseSettings.MAX_NETWORK_TIME_DELAY = timeout
    # On failure cc_admin asks NVML whether the local GPU is in DevTools mode; there is no
    # local GPU (the evidence is from another machine), and NVML would raise from `finally`.
    NvmlHandler.is_cc_dev_mode = staticmethod(lambda: False)
    errors = _Errors()
    for log in (info_log, event_log):
        log.addHandler(errors)

    arch_keys = {GPU_ARCHITECTURE_MAP[k].GPU_ARCH_NAME: k for k in (9, 10)}
    evidence = []
    for index, item in enumerate(request["evidence_list"]):
        arch = item.get("arch", "HOPPER").upper()
        if arch not in arch_keys:
            raise ValueError(f"GPU {index}: architecture {arch!r} is not one the SDK verifies")
        pem = base64.b64decode(item["certificate"])
        # TestHandle is the SDK's own way to feed a chain that did not come from NVML; the
        # chain's last certificate is replaced by the SDK's bundled device identity root.
        chain = GpuCertificateChains(TestHandle(pem)).GpuAttestationCertificateChain
        report = base64.b64decode(item["evidence"])
        evidence.append(_RemoteEvidence(index, arch_keys[arch], report, chain))

    params = {  # as nv_attestation_sdk.gpu.attest_gpu_local.attest builds them
        "verbose": False, "test_no_gpu": False, "driver_rim": None, "vbios_rim": None,
        "user_mode": True, "rim_root_cert": None, "rim_service_url": None, "ocsp_url": None,
        "allow_hold_cert": False, "nonce": request["nonce"], "ppcie_mode": True,
        "ocsp_nonce_disabled": False, "service_key": None, "claims_version": "3.0",
    }  # fmt: skip
    overall, detached = cc_admin.attest(params, request["nonce"], evidence)
    claims = {name: _jwt_payload(token) for name, token in detached[1].items()}
    for c in claims.values():
        for key in ("nbf", "exp", "iat", "jti"):
            c.pop(key, None)
    steps = {name: {s: c.get(s) for s in STEP_CLAIMS} for name, c in claims.items()}
    unreachable = any(_is_network(e) for e in errors.exceptions)
    error = None
    if not overall:
        error = "; ".join(dict.fromkeys(m for m in errors.messages if m)) or "attestation failed"
        if unreachable:
            error = f"nv-attestation-sdk needs NVIDIA's OCSP/RIM services: unreachable ({error})"
    return {"ok": bool(overall), "claims": claims, "steps": steps, "unreachable": unreachable,
            "error": error, "log": [m for m in errors.log if m and not m.startswith("---")]}  # fmt: skip


def main():
    # The SDK logs to stdout; keep fd 1 for the one JSON answer and send everything else to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # The SDK writes verifier.log and attestation_sdk.log into the working directory: keep them
    # out of the caller's tree.
    with tempfile.TemporaryDirectory(prefix="nvsdk-") as scratch:
        os.chdir(scratch)
        try:
            result = verify(json.load(sys.stdin))
        except Exception as exc:  # reported in the answer: the caller maps it onto a check
            result = {"ok": False, "claims": {}, "steps": {}, "unreachable": False,
                      "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
    json.dump(result, out, default=str)
    out.write("\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
