"""Typed verification results: one ``CheckResult`` per check, gathered in a ``VerificationResult``.

A check is ``pass``, ``fail`` or ``skip``. Whether a skip is acceptable is not the check's
business: the result knows which checks are required and which skips the caller relaxed, and
``ok`` follows from that alone, so no code path can hand back a bare ``True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from tee_inference.exceptions import VerificationError

__all__ = ["CheckResult", "Status", "VerificationError", "VerificationResult"]


class Status(StrEnum):
    PASS = "pass"  # noqa: S105 - a check status, not a password
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one named check; ``required`` checks decide the verdict, others inform."""

    name: str
    status: Status
    detail: str
    required: bool = True

    @classmethod
    def passed(cls, name: str, detail: str, *, required: bool = True) -> CheckResult:
        return cls(name, Status.PASS, detail, required)

    @classmethod
    def failed(cls, name: str, detail: str, *, required: bool = True) -> CheckResult:
        return cls(name, Status.FAIL, detail, required)

    @classmethod
    def skipped(cls, name: str, detail: str, *, required: bool = True) -> CheckResult:
        return cls(name, Status.SKIP, detail, required)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail}


@dataclass(frozen=True)
class VerificationResult:
    """Every check that ran or was skipped, and the verdict under the caller's relaxations.

    ``attested`` carries the facts that the passing checks established (the signing address bound
    in the quote, the model, whether it was simulated) for a caller that goes on to use them.
    """

    checks: tuple[CheckResult, ...]
    relaxed: frozenset[str] = frozenset()
    simulated: bool = False
    attested: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.blocking

    @property
    def blocking(self) -> tuple[CheckResult, ...]:
        """Checks that keep ``ok`` false: required failures, and required skips not relaxed."""
        return tuple(
            c
            for c in self.checks
            if c.required
            and (c.status is Status.FAIL or (c.status is Status.SKIP and c.name not in self.relaxed))
        )

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def names(self) -> list[str]:
        return [c.name for c in self.checks]

    def extended(self, checks: Iterable[CheckResult], **attested: Any) -> VerificationResult:
        return replace(self, checks=(*self.checks, *checks), attested={**self.attested, **attested})

    def relaxations(self) -> list[str]:
        """The required checks that were skipped and accepted only because the caller said so."""
        return sorted(
            c.name for c in self.checks if c.required and c.status is Status.SKIP and c.name in self.relaxed
        )

    def to_dict(self) -> dict[str, Any]:
        """SPEC §7's machine form, plus what was relaxed, ``simulated`` and what was attested."""
        return {
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "relaxed": self.relaxations(),
            "simulated": self.simulated,
            "attested": dict(self.attested),
        }
