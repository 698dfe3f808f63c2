"""Recompute every value of measurements/expected.json from source, or check them.

    python measurements/regenerate.py                       # rewrite expected.json, manifests, compose
    python measurements/regenerate.py --check               # fail if any committed value differs
    python measurements/regenerate.py --platform FILE -o X  # a real dstack release's platform instead
    python measurements/regenerate.py --tdx-provider dstack-native  # for OS images without EmitEvent

Values from this repository: the image digest (image/build_image.py, the reproducible layer), the
compose hash (sha256 of image/app-compose.json, generated from that digest and the model's root)
and MRCONFIGID (01 ‖ compose hash ‖ 00×15), and each shipped model's weights root
(tee_inference.measure over build/models/NAME, manifest kept in measurements/models/NAME.manifest).

Platform values (MRTD, RTMR0–2, OS image hash, TD attributes, XFAM, MRSEAM, MROWNER*) depend on
the dstack OS release and the VM's hardware configuration, not on this repository. By default they
are the SIMULATED platform's (`--tee simulated`), so `make run` verifies against the committed
file end to end. For a real deployment, `--platform FILE` takes them from a JSON file written from
the dstack release (measurements/README.md says how) and writes the result elsewhere (`-o`).
`source.commit` is the commit the values were regenerated from; --check compares the values only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "image"), str(REPO / "server")]

import build_image as image_build  # noqa: E402

from tee_inference.attestation.eventlog import mrconfigid_for  # noqa: E402
from tee_inference.attestation.simulated_platform import simulated_platform_measurements  # noqa: E402
from tee_inference.measure import measure_model  # noqa: E402

MODELS = {"SmolLM2-135M-Instruct": REPO / "build" / "models" / "SmolLM2-135M-Instruct"}
FORMAT = "tee-inference-measurements/v2"
COMPARED = ("image_digest", "compose_hash", "os_image_hash", "models", "tdx")
PLATFORM_KEYS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "os_image_hash", "td_attributes", "xfam", "mrseam")
# What dstack's OS and a Sapphire/Emerald Rapids host give a production TD (the simulator too):
# SEPT_VE_DISABLE only; x87, SSE, AVX, AVX-512, PKRU and AMX; no owner values.
TD_DEFAULTS = {"td_attributes": "0000001000000000", "xfam": "e702060000000000",
               "mrowner": "00" * 48, "mrownerconfig": "00" * 48}  # fmt: skip


def platform_values(platform_file: Path | None, compose: bytes) -> tuple[dict[str, list[str]], str]:
    """The TD report pins and OS image hash: the simulator's, or a real release's from a file."""
    if platform_file is None:
        sim = simulated_platform_measurements(compose)
        values = {k: [sim[k]] for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "os_image_hash")}
        values["mrseam"] = ["00" * 48]  # the simulated quote carries no TDX module
        return values, "the SIMULATED dstack platform of `--tee simulated` (not hardware)"
    given = json.loads(platform_file.read_text())
    missing = [k for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "os_image_hash", "mrseam") if k not in given]
    if missing:
        raise SystemExit(f"{platform_file}: missing {', '.join(missing)} (see measurements/README.md)")
    unknown = sorted(set(given) - {*PLATFORM_KEYS, "description"})
    if unknown:
        raise SystemExit(f"{platform_file}: unknown key(s) {', '.join(unknown)}")
    values = {k: [v.lower()] if isinstance(v, str) else [x.lower() for x in v]
              for k, v in given.items() if k in PLATFORM_KEYS}  # fmt: skip
    return values, str(given.get("description", platform_file.name))


def regenerate(
    workdir: Path, platform_file: Path | None = None, tdx_provider: str = "dstack"
) -> tuple[dict[str, object], dict[Path, str]]:
    """The expected-measurements document and the files it refers to (path -> text)."""
    outputs: dict[Path, str] = {}
    models: dict[str, dict[str, str]] = {}
    for name, directory in MODELS.items():
        if not directory.is_dir():
            raise SystemExit(f"model directory missing: {directory} (run `make model`)")
        measurement = measure_model(directory)
        models[name] = {"weights_root": measurement.root}
        outputs[REPO / "measurements" / "models" / f"{name}.manifest"] = measurement.manifest_text()
    # The image ships the manifests it provisions weights by: the fresh ones, not the committed.
    manifests = {name: outputs[REPO / "measurements" / "models" / f"{name}.manifest"] for name in models}
    built = image_build.build(workdir / "image", REPO / "build" / "image-cache", manifests=manifests)
    digest = built.digest
    (name, root), *_ = [(n, m["weights_root"]) for n, m in models.items()]
    compose = image_build.compose_text(f"{image_build.IMAGE_REPOSITORY}@{digest}", name, root, tdx_provider)
    outputs[REPO / "image" / "app-compose.json"] = compose
    compose_hash = image_build.compose_hash(compose)
    platform, platform_source = platform_values(platform_file, compose.encode())
    tdx = {
        **{k: [v] for k, v in TD_DEFAULTS.items()},
        **{k: v for k, v in platform.items() if k != "os_image_hash"},
    }
    tdx["mrconfigid"] = [mrconfigid_for(bytes.fromhex(compose_hash)).hex()]
    kind = (
        "the runnable image (the pinned base's layers, then ours)"
        if built.stacked
        else "our layer ALONE: no base imported (make pin-base), so not the runnable image's digest"
    )
    document: dict[str, object] = {
        "format": FORMAT,
        "description": (
            "Expected measurements of the example deployment: tee-inference on the pinned vLLM "
            "image in a dstack CVM, serving SmolLM2-135M-Instruct. Platform values (MRTD, RTMR0-2, "
            f"OS image hash, MRSEAM) are those of {platform_source}. image_digest is {kind}. "
            "Regenerate and check with "
            "`python measurements/regenerate.py [--check]`."
        ),
        "tdx": tdx,
        "image_digest": [digest],
        "compose_hash": [compose_hash],
        "os_image_hash": platform["os_image_hash"],
        "models": models,
        "source": {
            "commit": image_build.git("rev-parse", "HEAD"),
            "repository": image_build.SOURCE_REPOSITORY,
        },
    }
    outputs[REPO / "measurements" / "expected.json"] = json.dumps(document, indent=2, sort_keys=True) + "\n"
    return document, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="measurements/regenerate.py")
    parser.add_argument("--check", action="store_true", help="fail if a committed value differs")
    parser.add_argument(
        "--platform", type=Path, metavar="FILE", help="a real dstack release's platform values (JSON)"
    )
    parser.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write the expected file here (with --platform)"
    )
    parser.add_argument(
        "--tdx-provider", choices=["dstack", "dstack-native"], default="dstack",
        help="how the compose's server extends RTMR3: the agent's EmitEvent (released dstack OS "
        "images), or the TDX guest device (OS images whose agent has no EmitEvent)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.platform is not None and args.output is None and not args.check:
        parser.error("--platform needs -o FILE: measurements/expected.json keeps the simulated platform")
    with tempfile.TemporaryDirectory(prefix="tee-measure-") as tmp:
        try:
            document, outputs = regenerate(Path(tmp), args.platform, args.tdx_provider)
        except (image_build.BuildError, subprocess.CalledProcessError) as exc:
            print(f"regenerate: {exc}", file=sys.stderr)
            return 1
    if args.output is not None:
        expected = outputs.pop(REPO / "measurements" / "expected.json")
        outputs[args.output.resolve()] = expected
    if not args.check:
        for path, text in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        return 0
    expected_path = REPO / "measurements" / "expected.json"
    committed = json.loads(expected_path.read_text()) if expected_path.exists() else {}
    failures = [key for key in COMPARED if committed.get(key) != document[key]]
    failures += [
        str(path.relative_to(REPO))
        for path, text in outputs.items()
        if path != expected_path and (not path.exists() or path.read_text() != text)
    ]
    for key in failures:
        print(
            f"MISMATCH {key}: committed {committed.get(key)!r} != rebuilt {document.get(key)!r}",
            file=sys.stderr,
        )
    if not failures:
        print("measurements match: " + ", ".join(COMPARED))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
