"""Recompute every value of measurements/expected.json from source, or check them.

    python measurements/regenerate.py            # rebuild, rewrite expected.json, manifests, app-compose.json
    python measurements/regenerate.py --check    # rebuild and fail if any committed value differs

Values: the image digest (image/build_image.py, the reproducible layer), the compose hash
(sha256 of image/app-compose.json, generated from that digest and the model's root),
and each shipped model's weights root (tee_inference.measure over build/models/NAME,
manifest kept in measurements/models/NAME.manifest). TDX registers (MRTD, RTMR0-2)
depend on the dstack OS image and the VM's hardware configuration, not on this
repository, so they are not written here. `source.commit` is the commit the values
were regenerated from; --check compares the values, not that field.
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

from tee_inference.measure import measure_model  # noqa: E402

MODELS = {"SmolLM2-135M-Instruct": REPO / "build" / "models" / "SmolLM2-135M-Instruct"}
FORMAT = "tee-inference-measurements/v1"
COMPARED = ("image_digest", "compose_hash", "models")


def regenerate(workdir: Path) -> tuple[dict[str, object], dict[Path, str]]:
    """The expected-measurements document and the files it refers to (path -> text)."""
    outputs: dict[Path, str] = {}
    models: dict[str, dict[str, str]] = {}
    for name, directory in MODELS.items():
        if not directory.is_dir():
            raise SystemExit(f"model directory missing: {directory} (run `make model`)")
        measurement = measure_model(directory)
        models[name] = {"weights_root": measurement.root}
        outputs[REPO / "measurements" / "models" / f"{name}.manifest"] = measurement.manifest_text()
    digest = image_build.build(workdir / "image", REPO / "build" / "image-cache").digest
    (name, root), *_ = [(n, m["weights_root"]) for n, m in models.items()]
    compose = image_build.compose_text(
        f"{image_build.IMAGE_REPOSITORY}@{digest}",
        ["--model", f"/models/{name}", "--expect-weights-root", root],
    )
    outputs[REPO / "image" / "app-compose.json"] = compose
    document: dict[str, object] = {
        "format": FORMAT,
        "description": (
            "Expected measurements of the example deployment: tee-inference on the pinned vLLM "
            "image in a dstack CVM, serving SmolLM2-135M-Instruct. Regenerate and check with "
            "`python measurements/regenerate.py [--check]`."
        ),
        "image_digest": [digest],
        "compose_hash": [image_build.compose_hash(compose)],
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
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tee-measure-") as tmp:
        try:
            document, outputs = regenerate(Path(tmp))
        except (image_build.BuildError, subprocess.CalledProcessError) as exc:
            print(f"regenerate: {exc}", file=sys.stderr)
            return 1
    if not args.check:
        for path, text in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
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
