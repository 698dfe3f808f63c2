"""A SIMULATED dstack platform: the measurements a dstack CVM would have, made up and labelled so.

`--tee simulated` runs the whole attestation path on a machine with no TDX. For the verifier's
platform checks to run too (RTMR3 phases, MRCONFIGID, expected MRTD/RTMR0–2 and OS image hash),
the simulator behaves as dstack's OS does, with fixed values an expected-measurements file can pin:

    MRTD         sha384("tee-inference SIMULATED MRTD")
    RTMR0–2      replay of fixed SIMULATED firmware, boot-loader and kernel events
    MRCONFIGID   01 ‖ compose_hash ‖ 00×15                      (dstack's v1 layout)
    RTMR3        system-preparing, app-id, compose-hash, instance-id, boot-mr-done,
                 os-image-hash, key-provider, system-ready      (dstack's order, before any app)

``compose_hash`` is sha256 of the app-compose file the simulated CVM "launched" (the real
``image/app-compose.json`` under `make run`), so the expected file's compose hash means the same
thing as on dstack. Every payload that is text says SIMULATED; the quote's chain does too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Final

from tee_inference.attestation.eventlog import (
    DSTACK_SYSTEM_READY,
    Event,
    mrconfigid_for,
    replay,
    runtime_event,
)

SIMULATED_MRTD: Final = hashlib.sha384(b"tee-inference SIMULATED MRTD").digest()
SIMULATED_OS_IMAGE_HASH: Final = hashlib.sha256(b"tee-inference SIMULATED dstack OS image").digest()
# What the simulated platform launches when no compose file is named.
SIMULATED_DEFAULT_COMPOSE: Final = b'{"SIMULATED": "no app-compose file was given"}\n'
_PLATFORM_SEED: Final = hashlib.sha256(b"tee-inference SIMULATED platform").digest()


def simulated_boot_events(seed: bytes) -> list[Event]:
    """A few SIMULATED firmware/boot events for RTMR0–2 so a simulated quote's RTMRs are not zero.

    The payloads say outright that they are simulated; ``seed`` makes them differ per simulated
    machine while staying reproducible (the platform below uses one fixed seed).
    """
    tag = seed.hex()
    specs = (
        (0, 0x8000000A, "SIMULATED TDVF firmware volume"),
        (0, 0x80000001, "SIMULATED UEFI variable SecureBoot=0"),
        (0, 0x00000004, "SIMULATED separator"),
        (1, 0x80000003, "SIMULATED boot loader application"),
        (1, 0x80000007, "SIMULATED Exit Boot Services Invocation"),
        (2, 0x0000000D, "SIMULATED kernel command line"),
        (2, 0x00000006, "SIMULATED initrd"),
    )
    events = []
    for imr, event_type, text in specs:
        payload = f"{text} (seed {tag})".encode()
        events.append(Event(imr, event_type, hashlib.sha384(payload).digest(), "", payload))
    return events


@dataclass(frozen=True)
class SimulatedPlatform:
    """One simulated CVM launch: the compose it runs and its per-boot instance id."""

    compose_hash: bytes
    instance_id: bytes

    @classmethod
    def launch(cls, compose: bytes, seed: bytes) -> SimulatedPlatform:
        return cls(hashlib.sha256(compose).digest(), hashlib.sha256(b"instance" + seed).digest()[:20])

    @property
    def app_id(self) -> bytes:
        # dstack derives the app id from how the app was registered; here, from its compose.
        return hashlib.sha256(b"SIMULATED app id" + self.compose_hash).digest()[:20]

    @property
    def mrconfigid(self) -> bytes:
        return mrconfigid_for(self.compose_hash)

    def events(self) -> list[Event]:
        """RTMR0–2 boot events, then dstack's RTMR3 events up to and including system-ready."""
        key_provider = json.dumps({"id": "", "name": "none"}, separators=(",", ":")).encode()
        platform = (
            ("system-preparing", b""),
            ("app-id", self.app_id),
            ("compose-hash", self.compose_hash),
            ("instance-id", self.instance_id),
            ("boot-mr-done", b""),
            ("os-image-hash", SIMULATED_OS_IMAGE_HASH),
            ("key-provider", key_provider),
            (DSTACK_SYSTEM_READY, b""),
        )
        boot = simulated_boot_events(_PLATFORM_SEED)
        return [*boot, *(runtime_event(name, payload) for name, payload in platform)]


def simulated_platform_measurements(compose: bytes) -> dict[str, str]:
    """The values an expected-measurements file pins for a simulated CVM launched with ``compose``."""
    platform = SimulatedPlatform.launch(compose, bytes(32))
    rtmrs = replay(e for e in platform.events() if e.imr < 3)
    return {
        "mrtd": SIMULATED_MRTD.hex(),
        **{f"rtmr{i}": rtmrs[i].hex() for i in range(3)},
        "mrconfigid": platform.mrconfigid.hex(),
        "compose_hash": platform.compose_hash.hex(),
        "os_image_hash": SIMULATED_OS_IMAGE_HASH.hex(),
    }
