"""What one boot hands to the other serving processes of the CVM (see handoff.py): data only.

Kept apart from boot.py, which makes it, so that services.py (which keeps it for the launcher)
and handoff.py (which carries it) depend on the data and not on the boot sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tee_inference.exceptions import TrustRootError
from tee_inference.tee import JsonState


@dataclass(frozen=True)
class BootState:
    """What a serving process needs to carry on this boot: handed from the launcher, never stored.

    ``root_secret`` is the key source's secret; it travels only over the launcher's private
    handoff socket (`handoff.py`).
    """

    root_secret: bytes
    key_source: str
    weights_root: str | None
    tdx: JsonState
    gpu: JsonState
    tls: JsonState | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "root_secret": self.root_secret.hex(),
                "key_source": self.key_source,
                "weights_root": self.weights_root,
                "tdx": self.tdx,
                "gpu": self.gpu,
                "tls": self.tls,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BootState:
        try:
            obj = json.loads(data)
            return cls(
                root_secret=bytes.fromhex(obj["root_secret"]),
                key_source=str(obj["key_source"]),
                weights_root=obj["weights_root"],
                tdx=dict(obj["tdx"]),
                gpu=dict(obj["gpu"]),
                tls=dict(obj["tls"]) if obj.get("tls") else None,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise TrustRootError(f"the boot handoff is malformed: {type(exc).__name__}") from None
