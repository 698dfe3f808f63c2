"""Build SPEC §3 attestation reports the way a simulated server does, from the primitives.

The verifier's tests build reports here rather than through a server, so each binding can be
broken on its own: the simulated dstack platform (RTMR0–2, its RTMR3 events up to system-ready,
MRCONFIGID), our RTMR3 events after it, report_data, quote and GPU payload.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tee_inference.attestation.eventlog import EVENT_IMAGE, EVENT_KEYSET, EVENT_MODEL_WEIGHTS, EventLog
from tee_inference.attestation.nvidia_simulated import SimulatedGpu
from tee_inference.attestation.report_data import report_data_for_ecdsa, report_data_for_ed25519
from tee_inference.attestation.simulated_platform import (
    SIMULATED_DEFAULT_COMPOSE,
    SIMULATED_MRTD,
    SimulatedPlatform,
    simulated_platform_measurements,
)
from tee_inference.attestation.tdx_simulated import SimulatedQuoteSigner
from tee_inference.keys import derive_signer
from tee_inference.signing import CompletionSigner

SEED = bytes(range(32))
COMPOSE = b'{"services": "simulated test compose"}\n'
MODEL = "sim-model"
WEIGHTS_ROOT = hashlib.sha256(b"simulated weights").hexdigest()
IMAGE_DIGEST = "sha256:" + hashlib.sha256(b"simulated image").hexdigest()


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class SimulatedNode:
    """One simulated CVM: its quote signer, GPU, boot signing key and event log."""

    seed: bytes = SEED
    model: str = MODEL
    weights_root: str = WEIGHTS_ROOT
    image_digest: str | None = IMAGE_DIGEST
    key_epoch: int = 1

    def __post_init__(self) -> None:
        self.quote_signer = SimulatedQuoteSigner(self.seed)
        self.gpu = SimulatedGpu(self.seed)
        self.signer: CompletionSigner = derive_signer(
            hashlib.sha256(b"key" + self.seed).digest(), self.key_epoch
        )
        self.mrtd = SIMULATED_MRTD
        self.platform = SimulatedPlatform.launch(COMPOSE, self.seed)
        self.log = EventLog(self.platform.events())
        if self.image_digest is not None:
            self.log.append_runtime_event(
                EVENT_IMAGE, _json({"image_digest": self.image_digest, "version": "0.1.0"})
            )
        self.log.append_runtime_event(
            EVENT_MODEL_WEIGHTS, _json({"model": self.model, "root": self.weights_root})
        )
        self.log.append_runtime_event(EVENT_KEYSET, _json({
            "address": self.signer.ecdsa.address,
            "ed25519_public_key": self.signer.ed25519.public_key.hex(),
            "epoch": self.key_epoch,
            "key_source": "random",
        }))  # fmt: skip

    def report(
        self, nonce: bytes, signing_algo: str = "ecdsa", *, report_data: bytes | None = None
    ) -> dict[str, Any]:
        """The report for ``nonce``, a JSON-ready dict in the SPEC §3 form."""
        if report_data is None:
            if signing_algo == "ecdsa":
                report_data = report_data_for_ecdsa(bytes.fromhex(self.signer.ecdsa.address[2:]), nonce)
            else:
                report_data = report_data_for_ed25519(self.signer.ed25519.public_key, nonce)
        quote = self.quote_signer.quote(
            report_data, mrtd=self.mrtd, rtmrs=self.log.rtmrs(), mrconfigid=self.platform.mrconfigid
        )
        public_key = (
            self.signer.ecdsa.public_key if signing_algo == "ecdsa" else self.signer.ed25519.public_key
        )
        node = {
            "signing_address": self.signer.ecdsa.address,
            "signing_algo": signing_algo,
            "signing_public_key": public_key.hex(),
            "request_nonce": nonce.hex(),
            "intel_quote": quote.hex(),
            "nvidia_payload": self.gpu.payload(nonce).to_json(),
            "event_log": self.log.to_list(),
            "info": {
                "simulated": True,
                "tee": "simulated",
                "tdx_provider": "simulated",
                "gpu_provider": "simulated",
                "model": self.model,
                "model_weights_root": self.weights_root,
                "image_digest": self.image_digest,
                "compose_hash": None,
                "key_source": "random",
                "key_epoch": self.key_epoch,
                "versions": {"tee-inference": "0.1.0"},
            },
        }
        return {**node, "all_attestations": [dict(node)]}

    def expected_measurements(self) -> dict[str, Any]:
        """An expected-measurements document that this node satisfies, pinning every field."""
        platform = simulated_platform_measurements(COMPOSE)
        return {
            "format": "tee-inference-measurements/v2",
            "description": "simulated node for tests",
            "tdx": {
                **{k: [platform[k]] for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "mrconfigid")},
                "td_attributes": ["0000001000000000"],
                "xfam": ["e702060000000000"],
                "mrseam": ["00" * 48],
                "mrowner": ["00" * 48],
                "mrownerconfig": ["00" * 48],
            },
            "compose_hash": [platform["compose_hash"]],
            "os_image_hash": [platform["os_image_hash"]],
            **(
                {"image_digest": [self.image_digest]} if self.image_digest else {"unpinned": ["image_digest"]}
            ),
            "models": {self.model: {"weights_root": self.weights_root}},
            "source": {"repository": "tests", "commit": "0" * 40},
        }


def simulated_server_expectations(
    models: dict[str, str], *, compose: bytes = SIMULATED_DEFAULT_COMPOSE, image_digest: str | None = None
) -> dict[str, Any]:
    """The expected-measurements document a `--tee simulated` server satisfies (models: name -> root)."""
    platform = simulated_platform_measurements(compose)
    return {
        "format": "tee-inference-measurements/v2",
        "description": "a simulated tee-inference server",
        "tdx": {k: [platform[k]] for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "mrconfigid")},
        "compose_hash": [platform["compose_hash"]],
        "os_image_hash": [platform["os_image_hash"]],
        **({"image_digest": [image_digest]} if image_digest else {"unpinned": ["image_digest"]}),
        "models": {name: {"weights_root": root} for name, root in models.items()},
    }
