"""``tee-inference verify …``: build a verifier and a policy from arguments, print the result.

Nothing is decided here: every judgement lives in the library. The main command wires this in
with ``add_parser(subparsers)`` and dispatches to ``run(args)``; an unusable input raises
``VerificationError``, which the main command prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

from cryptography import x509

from tee_inference.exceptions import VerificationError
from tee_inference.verify.collateral import load_collateral
from tee_inference.verify.measurements import load_expected_measurements
from tee_inference.verify.nvsdk import DEFAULT_PYTHON, NvidiaSdkBackend
from tee_inference.verify.policy import KNOWN_TCB_STATUSES, RELAXABLE, VerificationPolicy
from tee_inference.verify.results import Status, VerificationResult
from tee_inference.verify.signature import verify_signature
from tee_inference.verify.usage import verify_usage
from tee_inference.verify.verifier import Verifier

EXIT_OK, EXIT_FAILED = 0, 1
_MARK = {Status.PASS: "PASS", Status.FAIL: "FAIL", Status.SKIP: "skip"}


def _evidence_options(p: argparse.ArgumentParser, *, report: bool) -> None:
    p.add_argument(
        "--collateral", action="append", default=[], metavar="FILE",
        help="Intel collateral (QuoteCollateralV3 JSON): offline TCB check; repeatable, one per platform "
        "(FMSPC) of the report's nodes: each quote is checked with its own",
    )  # fmt: skip
    p.add_argument("--pccs-url", metavar="URL", help="fetch collateral from this PCCS (online)")
    p.add_argument(
        "--now", type=int, metavar="EPOCH", help="check the collateral as of this time (default: now)"
    )
    p.add_argument(
        "--allow-tcb",
        action="append",
        default=[],
        choices=sorted(KNOWN_TCB_STATUSES - {"UpToDate", "Revoked"}),
        metavar="STATUS",
        help="also accept this TCB status (reported), e.g. SWHardeningNeeded; repeatable",
    )
    p.add_argument(
        "--allow-missing-collateral", action="store_true",
        help="accept that tcb_status is skipped when no collateral is given (offline audit)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help='print {"ok": …, "checks": […]} instead of a table')
    if report:
        p.add_argument(
            "--expect",
            action="append",
            default=[],
            metavar="FILE",
            help="expected-measurements file (measurements/); repeat to accept any one of them",
        )
        p.add_argument(
            "--no-measurements", action="store_true",
            help="accept that nothing was compared with an expected file (the verdict says so)",
        )  # fmt: skip
        p.add_argument(
            "--allow-simulated", action="store_true", help="accept SIMULATED evidence (testing only)"
        )
        p.add_argument("--allow-no-gpu", action="store_true", help="accept a report without GPU evidence")
        p.add_argument("--nras", action="store_true", help="also ask NVIDIA's NRAS (online)")
        p.add_argument(
            "--rim", action="append", default=[], metavar="FILE", type=Path,
            help="an NVIDIA RIM (driver or VBIOS reference measurements, signed XML) to compare the "
            "GPU measurements with; repeatable",
        )  # fmt: skip
        p.add_argument(
            "--rim-service", action="store_true", help="fetch RIMs from NVIDIA's RIM service (online)"
        )
        p.add_argument(
            "--require-rim", action="store_true", help="fail unless every GPU's RIMs were compared"
        )
        p.add_argument(
            "--ocsp", action="store_true", help="ask NVIDIA's OCSP responder about every certificate (online)"
        )
        p.add_argument(
            "--allow-ocsp-hold", action="store_true", help="accept certificates NVIDIA put on hold (reported)"
        )
        p.add_argument(
            "--nvidia-root", metavar="PEM", help="GPU trust anchor instead of the pinned NVIDIA root"
        )
        p.add_argument(
            "--gpu-backend", choices=["builtin", "nvidia-sdk"], default="builtin",
            help="nvidia-sdk: also run NVIDIA's nv-attestation-sdk (own venv: scripts/nvsdk-env.sh)",
        )  # fmt: skip
        p.add_argument(
            "--nvidia-sdk-python", metavar="PATH", type=Path, default=DEFAULT_PYTHON,
            help="python of the nv-attestation-sdk venv (default: the checkout's build/nvsdk-venv)",
        )  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``verify`` with its subcommands to the main command's subparsers."""
    verify = subparsers.add_parser("verify", help="verify attestation reports, quotes, signatures, endpoints")
    commands = verify.add_subparsers(dest="verify_command", required=True)
    report = commands.add_parser("report", help="verify a saved attestation report (SPEC §3)")
    report.add_argument("report", metavar="REPORT.json")
    report.add_argument("--nonce", metavar="HEX", help="the nonce you sent (64 hex): proves freshness")
    report.add_argument(
        "--allow-stale", action="store_true",
        help="accept a report without --nonce: it may be a replay (the verdict says so)",
    )  # fmt: skip
    report.add_argument(
        "--signing-algo", choices=["ecdsa", "ed25519"], help="the algorithm you asked the report for"
    )
    _evidence_options(report, report=True)
    quote = commands.add_parser("quote", help="verify a TDX quote (binary or hex), optionally its event log")
    quote.add_argument("quote", metavar="QUOTE_FILE")
    quote.add_argument("--event-log", metavar="FILE", help="JSON event log to replay against RTMR0–3")
    _evidence_options(quote, report=False)
    sig = commands.add_parser("signature", help="check a response signature (SPEC §2)")
    sig.add_argument("--text", required=True, help="the signed text, sha256(request):sha256(response)")
    sig.add_argument("--signature", required=True, metavar="HEX")
    who = sig.add_mutually_exclusive_group(required=True)
    who.add_argument("--address", help="ecdsa signer address 0x…")
    who.add_argument("--public-key", metavar="HEX", help="ed25519 public key")
    sig.add_argument("--json", action="store_true")
    usage = commands.add_parser(
        "usage", help="check a node's signed usage (the answer of GET /v1/signature/{id} or /v1/usage/{ref})"
    )
    usage.add_argument("record", metavar="RECORD.json", help="the JSON answer, or - for stdin")
    usage.add_argument("--id", metavar="ID", help="the completion id the usage must be for")
    signer = usage.add_mutually_exclusive_group(required=True)
    signer.add_argument("--address", help="the node's attested ecdsa address 0x…")
    signer.add_argument("--public-key", metavar="HEX", help="the node's attested ed25519 public key")
    usage.add_argument("--json", action="store_true")
    url = commands.add_parser("url", help="verify a live endpoint end to end with a fresh nonce")
    url.add_argument("base_url", metavar="BASE_URL")
    url.add_argument("--model", required=True, metavar="M")
    url.add_argument("--api-key-env", metavar="VAR", help="send 'Authorization: Bearer $VAR'")
    url.add_argument(
        "--allow-plaintext", action="store_true",
        help="accept plain http (loopback development): nothing ties the connection to the server",
    )  # fmt: skip
    url.add_argument(
        "--signing-algo", choices=["ecdsa", "ed25519"], default="ecdsa",
        help="the report to ask for, and the signature to check (default ecdsa)",
    )  # fmt: skip
    _evidence_options(url, report=True)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise VerificationError(f"cannot read {path}: {exc}") from None


def _policy(args: argparse.Namespace) -> VerificationPolicy:
    relax = {"tcb_status"} if args.allow_missing_collateral else set()
    if getattr(args, "no_measurements", False):
        if getattr(args, "expect", []):
            raise VerificationError("--no-measurements and --expect contradict each other")
        relax.add("measurements")
    if getattr(args, "allow_plaintext", False):
        relax.add("tls_binding")
    if getattr(args, "allow_stale", False):
        if getattr(args, "nonce", None):
            raise VerificationError("--allow-stale and --nonce contradict each other")
        relax.add("freshness")
    policy = VerificationPolicy.build(
        expected=[load_expected_measurements(p) for p in getattr(args, "expect", [])],
        allow_simulated=getattr(args, "allow_simulated", False),
        allow_tcb=args.allow_tcb,
        relax=relax,
        require_gpu=not getattr(args, "allow_no_gpu", False),
    )
    gpu = replace(
        policy.gpu,
        require_rim=getattr(args, "require_rim", False),
        require_ocsp=getattr(args, "ocsp", False),
        allow_ocsp_hold=getattr(args, "allow_ocsp_hold", False),
    )
    return replace(policy, gpu=gpu)


def _verifier(args: argparse.Namespace) -> Verifier:
    verifier = Verifier.production()
    if getattr(args, "nvidia_root", None):
        try:
            root = x509.load_pem_x509_certificate(_read(args.nvidia_root))
        except ValueError as exc:
            raise VerificationError(f"{args.nvidia_root} is not a PEM certificate: {exc}") from None
        verifier = Verifier(intel_root=verifier.intel_root, nvidia_root=root)
    if getattr(args, "gpu_backend", "builtin") == "nvidia-sdk":
        verifier = replace(verifier, nvidia_sdk=NvidiaSdkBackend(python=args.nvidia_sdk_python))
    return verifier


def _nonce(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        nonce = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        nonce = b""
    if len(nonce) != 32:
        raise VerificationError("--nonce must be 64 hex digits (32 bytes)")
    return nonce


def _run(args: argparse.Namespace) -> VerificationResult:
    if args.verify_command == "signature":
        check = verify_signature(args.text, args.signature, address=args.address, public_key=args.public_key)
        return VerificationResult((check,))
    if args.verify_command == "usage":
        return _usage(args)
    policy = _policy(args)
    collateral = [load_collateral(path) for path in args.collateral] or None
    verifier = _verifier(args)
    if args.verify_command == "quote":
        log = _read(args.event_log) if args.event_log else None
        return verifier.verify_quote(
            _read(args.quote),
            policy,
            event_log=log,
            collateral=collateral,
            pccs_url=args.pccs_url,
            now=args.now,
        )
    nras_client = rim_client = ocsp_client = None
    if args.nras or args.rim_service or args.ocsp:  # pragma: no cover - network
        import httpx

        online = httpx.Client(timeout=60.0)
        nras_client = online if args.nras else None
        rim_client = online if args.rim_service else None
        ocsp_client = online if args.ocsp else None

    if args.verify_command == "report":
        return verifier.verify_report(
            _read(args.report), policy, nonce=_nonce(args.nonce), collateral=collateral,
            pccs_url=args.pccs_url, now=args.now, nras_client=nras_client, signing_algo=args.signing_algo,
            rims=args.rim, rim_client=rim_client, ocsp_client=ocsp_client,
        )  # fmt: skip
    from tee_inference.verify.e2e import verify_url

    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and api_key is None:
        raise VerificationError(f"--api-key-env {args.api_key_env}: the variable is not set")
    return verify_url(
        args.base_url,
        args.model,
        policy,
        verifier=verifier,
        api_key=api_key,
        collateral=collateral,
        pccs_url=args.pccs_url,
        now=args.now,
        signing_algo=args.signing_algo,
        nras_client=nras_client,
        rims=args.rim,
        rim_client=rim_client,
        ocsp_client=ocsp_client,
    )


def _usage(args: argparse.Namespace) -> VerificationResult:
    raw = sys.stdin.buffer.read() if args.record == "-" else _read(args.record)
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise VerificationError(f"{args.record} is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise VerificationError(f"{args.record} is not a JSON object")
    usage, checks = verify_usage(
        record, address=args.address, public_key=args.public_key, completion_id=args.id
    )
    attested = {"usage": None if usage is None else {
        "id": usage.completion_id, "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens, "source": usage.source,
    }}  # fmt: skip
    return VerificationResult(tuple(checks), attested=attested)


def format_table(result: VerificationResult, *, width: int = 100) -> str:
    """Check, result, detail; then the verdict and what kept it from passing."""
    name_width = max([len(c.name) for c in result.checks] + [5])
    lines = [f"{'check'.ljust(name_width)}  result  detail", f"{'-' * name_width}  ------  {'-' * 40}"]
    for c in result.checks:
        mark = _MARK[c.status] + ("" if c.required or c.status is Status.PASS else "*")
        if c.status is Status.SKIP and c.name in result.relaxed:
            mark = "skip~"
        wrapped = textwrap.wrap(c.detail, max(40, width - name_width - 10)) or [""]
        lines.append(f"{c.name.ljust(name_width)}  {mark.ljust(6)}  {wrapped[0]}")
        lines += [f"{' ' * (name_width + 10)}{more}" for more in wrapped[1:]]
    lines.append("")
    lines.append("(* informational: not required; ~ skipped, accepted by an option that relaxes it)")
    verdict = "OK" if result.ok else "NOT VERIFIED"
    if result.simulated:
        verdict += " (SIMULATED evidence: not hardware-backed)"
    relaxed = result.relaxations()
    if result.ok and relaxed:
        verdict += " WITH RELAXATIONS: " + ", ".join(
            f"{name} not checked ({RELAXABLE[name]})" for name in relaxed
        )
    lines.append(f"verdict: {verdict}")
    if not result.ok:
        lines.append("blocking: " + ", ".join(f"{c.name} ({c.status.value})" for c in result.blocking))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run one ``verify`` subcommand; exit 0 only when every required check passed."""
    result = _run(args)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_table(result))
    return EXIT_OK if result.ok else EXIT_FAILED
