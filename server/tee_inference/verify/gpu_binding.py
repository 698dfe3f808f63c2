"""``gpu_binding``: the GPU evidence of a report comes from the very devices this CVM attested at boot.

A report's ``nvidia_payload`` is bound to its quote only by the shared nonce: anyone who can ask
some GPU for evidence with that nonce could attach it. With ``serve --gpu-ready-gate`` the boot
attested its own GPUs (and NVSwitches) and recorded each device's identity in RTMR3
(``tee-inference:gpu-gate``, read only from a log that replayed to the quote). Then:

- every device in the report's evidence must be one the gate recorded (same ``ueid`` and, when
  recorded, the same BROM identity key), and
- every device the gate recorded must be in the evidence: one entry per GPU of the CVM, so a
  report cannot leave out a GPU that serves requests.

The check is required when the event is present; a report without it is a non-blocking skip that
says so, because today's dstack-based deployments have no such record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tee_inference.attestation.nvidia_devices import DeviceIdentity
from tee_inference.verify.results import CheckResult

GPU_BINDING = "gpu_binding"


def _recorded(gate: Mapping[str, Any]) -> list[tuple[str, str | None]] | None:
    devices = gate.get("devices")
    if not isinstance(devices, list) or not devices:
        return None
    out = []
    for device in devices:
        if not isinstance(device, Mapping) or not isinstance(device.get("ueid"), str):
            return None
        key = device.get("identity_key_sha256")
        out.append((str(device["ueid"]), key if isinstance(key, str) else None))
    return out


def check_gpu_binding(gate: Mapping[str, Any] | None, identities: Sequence[DeviceIdentity]) -> CheckResult:
    """``gate``: the gpu-gate event's payload (None: no event); ``identities``: the evidence's devices."""
    if gate is None:
        return CheckResult.skipped(
            GPU_BINDING,
            "no tee-inference:gpu-gate event in RTMR3: this boot recorded no local GPU attestation, so the "
            "GPU evidence is tied to the CVM by the shared nonce only",
            required=False,
        )
    recorded = _recorded(gate)
    if recorded is None:
        return CheckResult.failed(GPU_BINDING, "the gpu-gate event lists no device identities")
    by_ueid = dict(recorded)
    problems = []
    seen: set[str] = set()
    for number, identity in enumerate(identities):
        key = by_ueid.get(identity.ueid, "absent")
        if key == "absent":
            problems.append(f"evidence device {number} (ueid {identity.ueid}) was not attested at boot")
        elif key is not None and key != identity.identity_key_sha256:
            problems.append(f"evidence device {number} (ueid {identity.ueid}): identity key not the boot's")
        else:
            seen.add(identity.ueid)
    missing = [ueid for ueid, _ in recorded if ueid not in seen]
    if len(identities) != len(recorded):
        problems.append(
            f"{len(identities)} evidence entries for the {len(recorded)} device(s) attested at boot"
        )
    if missing:
        problems.append(
            f"{len(missing)} device(s) attested at boot are not in the evidence (ueid {', '.join(missing)})"
        )
    if problems:
        return CheckResult.failed(GPU_BINDING, "; ".join(problems))
    return CheckResult.passed(
        GPU_BINDING,
        f"the evidence's {len(identities)} device(s) are exactly the {len(recorded)} this CVM attested "
        "at boot (tee-inference:gpu-gate, by ueid and identity key)",
    )
