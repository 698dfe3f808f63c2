"""The attestation report of SPEC §3 as one typed model, built by the server and read by the verifier.

    {"signing_address": "0x…", "signing_algo": "ecdsa", "signing_public_key": hex,
     "request_nonce": hex(32), "intel_quote": hex, "nvidia_payload": "<JSON string>",
     "event_log": [{imr, event_type, digest, event, event_payload}, …], "info": {…},
     "tls_cert_fingerprint": hex(32)   # when the server terminates TLS: sha256 of the SPKI
     "all_attestations": [<the fields above, one object per serving node>]}

The model checks the report's *shape* only (types, hex, sizes). The quote, the event log and the
GPU payload keep their raw form here, because each is judged by its own check (a malformed quote
is a failed ``quote_structure``, not an unreadable report).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from tee_inference.signing import SigningAlgo, parse_signing_algo

_ADDRESS: Final = re.compile(r"0x[0-9a-fA-F]{40}")
_PUBLIC_KEY_SIZES: Final[Mapping[str, int]] = {"ecdsa": 65, "ed25519": 32}


@dataclass(frozen=True)
class AttestationReport:
    signing_address: str
    signing_algo: SigningAlgo
    signing_public_key: bytes
    request_nonce: bytes
    intel_quote: str
    nvidia_payload: str | None
    event_log: list[Any]
    info: Mapping[str, Any]
    all_attestations: tuple[AttestationReport, ...] = field(default=())
    # sha256 of the TLS certificate's SPKI (hex), when the server terminates TLS itself.
    tls_cert_fingerprint: str | None = None

    @property
    def identity(self) -> bytes:
        """What report_data binds: the 20-byte address (ecdsa) or the 32-byte public key (ed25519)."""
        if self.signing_algo == "ecdsa":
            return bytes.fromhex(self.signing_address[2:])
        return self.signing_public_key

    def node_dict(self) -> dict[str, Any]:
        """This node's fields, as one entry of ``all_attestations``."""
        return {
            "signing_address": self.signing_address,
            "signing_algo": self.signing_algo,
            "signing_public_key": self.signing_public_key.hex(),
            "request_nonce": self.request_nonce.hex(),
            "intel_quote": self.intel_quote,
            "nvidia_payload": self.nvidia_payload,
            "event_log": self.event_log,
            "info": dict(self.info),
            **({"tls_cert_fingerprint": self.tls_cert_fingerprint} if self.tls_cert_fingerprint else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        """The report as served: this node's fields, then every node (itself when single)."""
        nodes = self.all_attestations or (self,)
        return {**self.node_dict(), "all_attestations": [n.node_dict() for n in nodes]}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode("utf-8")

    @classmethod
    def parse(cls, obj: Any, *, nested: bool = False) -> tuple[AttestationReport | None, list[str]]:
        """The typed report, or None and every problem with its shape (one line each)."""
        if not isinstance(obj, Mapping):
            return None, ["the report must be a JSON object"]
        problems: list[str] = []
        address = obj.get("signing_address")
        if not isinstance(address, str) or _ADDRESS.fullmatch(address) is None:
            problems.append("signing_address must be 0x and 40 hex digits")
        algo = parse_signing_algo(obj.get("signing_algo"))
        if algo is None:
            problems.append(f"signing_algo must be 'ecdsa' or 'ed25519', got {obj.get('signing_algo')!r}")
        public_key = _hex(obj, "signing_public_key", problems, _PUBLIC_KEY_SIZES.get(str(algo)))
        nonce = _hex(obj, "request_nonce", problems, 32)
        quote, payload, info = obj.get("intel_quote"), obj.get("nvidia_payload"), obj.get("info", {})
        if not isinstance(quote, str) or not quote:
            problems.append("intel_quote must be a hex string")
        if payload is not None and not isinstance(payload, str):
            problems.append("nvidia_payload must be a JSON string (SPEC §3), not an object")
        if not isinstance(obj.get("event_log"), list):
            problems.append("event_log must be a list of events")
        if not isinstance(info, Mapping):
            problems.append("info must be an object")
        fingerprint = obj.get("tls_cert_fingerprint")
        if fingerprint is not None:
            _hex(obj, "tls_cert_fingerprint", problems, 32)
        nodes: list[AttestationReport] = []
        raw_nodes = obj.get("all_attestations", [])
        if nested:
            raw_nodes = []
        elif not isinstance(raw_nodes, list):
            problems.append("all_attestations must be a list of objects")
            raw_nodes = []
        for index, raw in enumerate(raw_nodes):
            node, node_problems = cls.parse(raw, nested=True)
            problems += [f"all_attestations[{index}]: {p}" for p in node_problems]
            if node is not None:
                nodes.append(node)
        if problems or algo is None:
            return None, problems
        report = cls(
            signing_address=str(address), signing_algo=algo, signing_public_key=public_key,
            request_nonce=nonce, intel_quote=str(quote), nvidia_payload=payload,
            event_log=list(obj["event_log"]), info=info, all_attestations=tuple(nodes),
            tls_cert_fingerprint=fingerprint.lower() if isinstance(fingerprint, str) else None,
        )  # fmt: skip
        return report, []


def _hex(obj: Mapping[str, Any], key: str, problems: list[str], size: int | None = None) -> bytes:
    value = obj.get(key)
    try:
        data = bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else None
    except ValueError:
        data = None
    if data is None or (size is not None and len(data) != size):
        problems.append(f"{key} must be {'hex' if size is None else f'{size * 2} hex digits'}")
        return b""
    return data
