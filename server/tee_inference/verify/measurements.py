"""Expected measurements: the reviewed file format, its loader, and the field-by-field comparison.

The format (``tee-inference-measurements/v2``) is documented for auditors in
``measurements/README.md``. A file must pin the whole stack — the TD's firmware and OS (MRTD,
RTMR0–2), the dstack app (compose hash) and OS image, the container image and every model's
weights — or say by name which of those it leaves open (``unpinned``): a value a workload
reports about itself proves nothing unless something below it is pinned too. Unknown keys are
an error, not ignored: a misspelt ``mrdt`` that is silently skipped would make a file look
stricter than it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tee_inference.verify.results import VerificationError

FORMAT: Final = "tee-inference-measurements/v2"
# TD report fields a file may pin, by size in bytes. RTMR3 is absent on purpose: it holds
# per-boot events (the signing key), checked through the decoded events instead.
TDX_FIELDS: Final[Mapping[str, int]] = {
    "mrtd": 48, "rtmr0": 48, "rtmr1": 48, "rtmr2": 48, "mrconfigid": 48, "mrseam": 48,
    "mrowner": 48, "mrownerconfig": 48, "td_attributes": 8, "xfam": 8,
}  # fmt: skip
APP_FIELDS: Final = ("image_digest", "compose_hash", "os_image_hash")
# What a file must pin or name under `unpinned`: without these, any OS or app passes.
REQUIRED_PINS: Final = (
    "mrtd",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "compose_hash",
    "os_image_hash",
    "image_digest",
    "models",
)
_TOP_KEYS: Final = frozenset({"format", "description", "tdx", *APP_FIELDS, "models", "source", "unpinned"})
_HEX32 = re.compile(r"[0-9a-f]{64}")
_IMAGE_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class MeasurementsFormatError(VerificationError):
    """An expected-measurements file does not follow the format; the message names the field."""


@dataclass(frozen=True)
class ExpectedMeasurements:
    """What a reviewed release is allowed to measure. An empty tuple or mapping means not pinned."""

    tdx: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    image_digest: tuple[str, ...] = ()
    compose_hash: tuple[str, ...] = ()
    os_image_hash: tuple[str, ...] = ()
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unpinned: frozenset[str] = frozenset()
    description: str = ""
    source: Mapping[str, str] = field(default_factory=dict)
    origin: str = "<memory>"

    def __post_init__(self) -> None:
        pinned = {k for k, v in self.tdx.items() if v} | {k for k in APP_FIELDS if getattr(self, k)}
        pinned |= {"models"} if self.models else set()
        both = pinned & self.unpinned
        if both:
            raise MeasurementsFormatError(
                f"{self.origin}: {', '.join(sorted(both))} both pinned and unpinned"
            )
        missing = [k for k in REQUIRED_PINS if k not in pinned and k not in self.unpinned]
        if missing:
            raise MeasurementsFormatError(
                f"{self.origin}: does not pin {', '.join(missing)}; pin them, or list them under "
                '"unpinned" to accept any value knowingly'
            )

    def to_json(self) -> str:
        """The canonical text: sorted keys, two-space indent, one value per line, for clean diffs."""
        obj: dict[str, Any] = {"format": FORMAT, "description": self.description}
        if self.tdx:
            obj["tdx"] = {k: list(v) for k, v in self.tdx.items()}
        for key in APP_FIELDS:
            values: tuple[str, ...] = getattr(self, key)
            if values:
                obj[key] = list(values)
        if self.models:
            obj["models"] = {name: {"weights_root": roots[0] if len(roots) == 1 else list(roots)}
                             for name, roots in self.models.items()}  # fmt: skip
        if self.unpinned:
            obj["unpinned"] = sorted(self.unpinned)
        if self.source:
            obj["source"] = dict(self.source)
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _values(
    obj: Mapping[str, Any], key: str, where: str, pattern: re.Pattern[str], what: str
) -> tuple[str, ...]:
    value = obj[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise MeasurementsFormatError(f"{where}{key}: must be a non-empty list of {what}")
    out = []
    for index, item in enumerate(items):
        if not isinstance(item, str) or pattern.fullmatch(item.lower()) is None:
            raise MeasurementsFormatError(f"{where}{key}[{index}]: {item!r} is not {what}")
        out.append(item.lower())
    return tuple(out)


def parse_expected_measurements(text: str | bytes, *, origin: str = "<text>") -> ExpectedMeasurements:
    """Read the JSON text of an expected-measurements file, or raise MeasurementsFormatError."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise MeasurementsFormatError(f"{origin}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MeasurementsFormatError(f"{origin}: must be a JSON object")
    if obj.get("format") == "tee-inference-measurements/v1":
        raise MeasurementsFormatError(
            f"{origin}: format v1 did not pin the platform; regenerate it as {FORMAT} "
            "(measurements/README.md says how)"
        )
    if obj.get("format") != FORMAT:
        raise MeasurementsFormatError(f"{origin}: format must be {FORMAT!r}, got {obj.get('format')!r}")
    unknown = sorted(set(obj) - _TOP_KEYS)
    if unknown:
        raise MeasurementsFormatError(f"{origin}: unknown key(s) {', '.join(unknown)}")
    tdx: dict[str, tuple[str, ...]] = {}
    raw_tdx = obj.get("tdx", {})
    if not isinstance(raw_tdx, dict):
        raise MeasurementsFormatError(f"{origin}: tdx must be an object")
    for key in raw_tdx:
        if key not in TDX_FIELDS:
            raise MeasurementsFormatError(f"{origin}: tdx.{key} is not one of {', '.join(TDX_FIELDS)}")
        size = TDX_FIELDS[key]
        pattern = re.compile(f"[0-9a-f]{{{2 * size}}}")
        tdx[key] = _values(raw_tdx, key, "tdx.", pattern, f"{size}-byte lowercase hex")
    lists = {}
    for key, pattern, what in (
        ("image_digest", _IMAGE_DIGEST, "'sha256:' + 64 hex"),
        ("compose_hash", _HEX32, "32-byte hex"),
        ("os_image_hash", _HEX32, "32-byte hex"),
    ):
        lists[key] = _values(obj, key, "", pattern, what) if key in obj else ()
    models: dict[str, tuple[str, ...]] = {}
    raw_models = obj.get("models", {})
    if not isinstance(raw_models, dict):
        raise MeasurementsFormatError(f"{origin}: models must be an object keyed by served model name")
    for name, spec in raw_models.items():
        if not isinstance(spec, dict) or set(spec) != {"weights_root"}:
            raise MeasurementsFormatError(f'{origin}: models.{name} must be {{"weights_root": hex}}')
        models[name] = _values(spec, "weights_root", f"models.{name}.", _HEX32, "32-byte hex")
    unpinned = obj.get("unpinned", [])
    if not isinstance(unpinned, list) or not all(u in REQUIRED_PINS for u in unpinned):
        raise MeasurementsFormatError(f"{origin}: unpinned must list some of {', '.join(REQUIRED_PINS)}")
    description, source = obj.get("description", ""), obj.get("source", {})
    if not isinstance(description, str):
        raise MeasurementsFormatError(f"{origin}: description must be a string")
    if not isinstance(source, dict) or not all(isinstance(v, str) for v in source.values()):
        raise MeasurementsFormatError(f"{origin}: source must be an object of strings")
    return ExpectedMeasurements(
        tdx=tdx, image_digest=lists["image_digest"], compose_hash=lists["compose_hash"],
        os_image_hash=lists["os_image_hash"], models=models, unpinned=frozenset(unpinned),
        description=description, source=dict(source), origin=origin,
    )  # fmt: skip


def load_expected_measurements(path: str | Path) -> ExpectedMeasurements:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise MeasurementsFormatError(f"cannot read expected measurements {path}: {exc}") from None
    return parse_expected_measurements(text, origin=str(path))


@dataclass(frozen=True)
class MeasuredValues:
    """Values taken from a verified quote and a replayed event log; None when not measured.

    ``tdx`` holds every TD report field of ``TDX_FIELDS`` as lowercase hex (the quote's bytes).
    """

    tdx: Mapping[str, str]
    image_digest: str | None = None
    compose_hash: str | None = None
    os_image_hash: str | None = None
    models: Mapping[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.tdx.items()},
            **{k: getattr(self, k) for k in APP_FIELDS if getattr(self, k)},
            "models": dict(self.models),
        }


@dataclass(frozen=True)
class FieldComparison:
    field: str
    ok: bool
    actual: str | None
    expected: tuple[str, ...]

    def __str__(self) -> str:
        if self.ok:
            return f"{self.field} ok"
        if self.actual is None:
            return f"{self.field} not measured (expected {_show(self.expected)})"
        return f"{self.field} is {_short(self.actual)}, expected {_show(self.expected)}"


def _short(value: str) -> str:
    return value if len(value) <= 24 else f"{value[:16]}…{value[-6:]}"


def _show(values: Sequence[str]) -> str:
    shown = [_short(v) for v in values]
    return shown[0] if len(shown) == 1 else "one of " + ", ".join(shown)


def compare_measurements(expected: ExpectedMeasurements, measured: MeasuredValues) -> list[FieldComparison]:
    """One comparison per pinned field, in a fixed order; unpinned fields are not listed."""
    out = []
    for key, allowed in expected.tdx.items():
        actual = measured.tdx.get(key)
        out.append(FieldComparison(key, actual in allowed, actual, allowed))
    for key in APP_FIELDS:
        allowed = getattr(expected, key)
        if allowed:
            actual = getattr(measured, key)
            out.append(FieldComparison(key, actual in allowed, actual, allowed))
    if expected.models:
        if not measured.models:
            out.append(FieldComparison("models", False, None, tuple(expected.models)))
        for name, root in measured.models.items():
            allowed = expected.models.get(name, ())
            label = f"models.{name}.weights_root"
            if not allowed:
                label = f"model {name!r} (not in the expected file)"
            out.append(FieldComparison(label, root in allowed, root, allowed or ("<none>",)))
    return out
