"""One exception root for everything this package refuses, with the exit code the CLI gives it.

``cli.main`` catches ``TeeInferenceError`` once and prints its message as one line (a
``StartRefused`` prints one line per reason); nothing below it prints or exits on its own.
Messages are for people: they name the setting, file, socket or byte offset at fault, and
never carry key material, prompts or completions.

    TeeInferenceError
    ├── ConfigError           a setting is missing or inconsistent           (exit 2)
    ├── StartRefused          a fail-closed start check failed               (exit 1)
    ├── TrustRootError        TDX, GPU or dstack unavailable or failing      (exit 1)
    ├── KeySourceError        the signing key's source cannot give a secret  (exit 2)
    ├── EngineStartError      the engine did not come up                     (exit 1)
    ├── MeasurementError      a model directory cannot be measured           (exit 2)
    ├── VerificationError     a verifier input is unusable (not: evidence is bad) (exit 2)
    └── EvidenceError         attestation evidence is malformed or does not verify
        └── FormatError       bytes that do not follow their format (quote, event log, …)
"""

from __future__ import annotations

from collections.abc import Sequence


class TeeInferenceError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code: int = 1


class ConfigError(TeeInferenceError, ValueError):
    """The configuration is inconsistent or incomplete; the message says which setting."""

    exit_code = 2


class StartRefused(TeeInferenceError):
    """The server must not start; ``reasons`` holds one line per failed check."""

    def __init__(self, reasons: Sequence[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


class TrustRootError(TeeInferenceError, RuntimeError):
    """A trust root is missing or failed; the message is one line a person can act on."""


class KeySourceError(TeeInferenceError, RuntimeError):
    """The key source cannot provide a secret; the message never contains key material."""

    exit_code = 2


class EngineStartError(TeeInferenceError, RuntimeError):
    """The inference engine exited or never became healthy."""


class MeasurementError(TeeInferenceError):
    """A model directory cannot be measured (a mismatch with a manifest exits 1 instead)."""

    exit_code = 2


class VerificationError(TeeInferenceError, ValueError):
    """A verifier's own input cannot be used (unreadable file, bad nonce, bad expectations file).

    Evidence that is merely wrong never raises this: it yields failing checks, so a person sees
    every problem at once and not only the first.
    """

    exit_code = 2


class EvidenceError(TeeInferenceError):
    """Attestation evidence (a quote, GPU report, certificate chain, NRAS token) does not hold."""


class FormatError(EvidenceError, ValueError):
    """Bytes that do not follow their format; the message names the field or byte offset."""
