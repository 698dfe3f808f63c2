"""Reproducible build of our application layer, and the dstack deployment descriptor.

    python image/build_image.py build [--out build/image] [--base-layout DIR]   # prints the digest
    python image/build_image.py reproduce [--base-layout DIR]  # two builds in fresh temp dirs, same digest?
    python image/build_image.py compose                        # writes image/app-compose.json
    python image/build_image.py wheels --python-version X.Y --out DIR   # the layer's files for another Python

With a base layout (``--base-layout``, ``$BASE``, or the digest-only import in ``image/base/``)
the result is the runnable image: the pinned vLLM base's layers, then ours (image/stack.py);
without one it is our layer alone, which names the base but cannot run by itself.

The layer holds /opt/tee-inference/: our wheel (built with SOURCE_DATE_EPOCH = the
fixed time, from a copy of the tracked sources with normalized modes), the runtime
dependency wheels chosen by ``pip download --require-hashes`` for CPython 3.12 on
manylinux x86_64 (the vLLM image's interpreter), the lock they satisfy plus our
wheel's hash, and the entrypoint. Every input is fixed by a hash or by the source
tree, so the digest depends only on the commit. Nothing is installed by a ``RUN``
step (whose output carries timestamps and .pyc files): the entrypoint installs the
wheels offline (``--no-index --require-hashes``) when the container starts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose import compose_hash as compose_hash
from compose import compose_text as compose_text
from oci import FileSpec, Image, build_image, compress, layer_tar, write_layout
from stack import BaseImage, StackError, import_base, link_base_layers, read_base_layout, stack

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/opt/tee-inference"
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
SOURCE_REPOSITORY = "https://github.com/tee-inference/tee-inference"
IMAGE_REPOSITORY = "ghcr.io/tee-inference/tee-inference"
WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "server")
# The digest-only import of the base (index, manifest, config; no layers), from `make pin-base`.
BASE_IMPORT = REPO / "image" / "base"
MODEL_MANIFESTS = REPO / "measurements" / "models"
# TLS only: the server listens here with its in-CVM key; there is no plaintext port.
PORT = 8443
FROM_LINE = re.compile(
    r"^FROM\s+(?P<name>[^\s:@]+(?::\d+)?/[^\s:@]+):(?P<tag>[\w.-]+)@(?P<digest>sha256:[0-9a-f]{64})\s*$"
)

ENTRYPOINT = f"""#!/bin/sh
# Installs the measured wheels offline (no index; every file checked against the lock's
# sha256) into the image's Python, then runs the signing server in front of vLLM with
# the TDX trust roots. Arguments (model, expected weights root) come from app-compose.
set -eu
# {PREFIX} in the image; found from this file so that the layer's tree works wherever it is unpacked.
here="$(cd "$(dirname "$0")/.." && pwd)"
python3 -m pip install --quiet --no-index --no-deps --require-hashes \\
    --find-links "$here/wheels" -r "$here/requirements.txt"
exec tee-inference serve --engine vllm --tee tdx --host 0.0.0.0 --port {PORT} "$@"
"""


class BuildError(Exception):
    pass


@dataclass(frozen=True)
class Base:
    name: str
    tag: str
    digest: str

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}@{self.digest}"


def read_base(containerfile: Path) -> Base:
    """The ``FROM`` of the Containerfile; a base without ``@sha256:`` is refused."""
    froms = [line for line in containerfile.read_text().splitlines() if line.startswith("FROM")]
    if len(froms) != 1:
        raise BuildError(f"{containerfile}: expected exactly one FROM line")
    match = FROM_LINE.match(froms[0])
    if match is None:
        raise BuildError(
            f"{containerfile}: base image is not pinned by digest: {froms[0]!r} (run make pin-base)"
        )
    return Base(match["name"], match["tag"], match["digest"])


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


# A constant, not the commit time: the digest must be a function of the content alone, so
# that measurements/expected.json can be committed together with the sources it measures
# (a commit time would change the digest on every commit, including that one). 1980-01-01
# is the earliest time a wheel's zip entries can carry.
DEFAULT_EPOCH = 315532800


def source_date_epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH") or DEFAULT_EPOCH)


def copy_sources(dest: Path) -> None:
    """Tracked and non-ignored files only, with modes that do not depend on the umask."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *WHEEL_SOURCES)
    for rel in sorted(p for p in listed.split("\0") if p):
        src = REPO / rel
        if not src.is_file():  # deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
        target.chmod(0o644)


def build_env(cache: Path) -> Path:
    """A venv with the hash-pinned build backend (requirements/build.txt), made once."""
    venv = cache / "buildenv"
    python = venv / "bin" / "python"
    stamp = venv / "build.txt.sha256"
    want = hashlib.sha256((REPO / "requirements" / "build.txt").read_bytes()).hexdigest()
    if not (python.exists() and stamp.exists() and stamp.read_text() == want):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip_install = [str(python), "-m", "pip", "install", "-q", "--require-hashes"]
        subprocess.run([*pip_install, "-r", str(REPO / "requirements" / "build.txt")], check=True)
        stamp.write_text(want)
    return python


def build_wheel(cache: Path, epoch: int, work: Path) -> Path:
    python = build_env(cache)
    src, out = work / "src", work / "wheel"
    copy_sources(src)
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "PYTHONHASHSEED": "0"}
    cmd = [str(python), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "."]
    subprocess.run(cmd, cwd=src, env=env, check=True)
    wheels = list(out.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel, got {wheels}")
    return wheels[0]


def download_dependencies(lock: Path, work: Path, python_version: str = TARGET_PYTHON) -> list[Path]:
    """The lock's wheels for the image's Python; pip refuses any file whose hash is not in the lock."""
    out = work / "deps"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--require-hashes", "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    cmd += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([*cmd, "-d", str(out), "-r", str(lock)], check=True)
    return sorted(out.glob("*.whl"))


def model_manifests() -> dict[str, str]:
    """The committed weights manifests, by model name (fetch-model checks downloads against them)."""
    paths = sorted(MODEL_MANIFESTS.glob("*.manifest"))
    return {p.name.removesuffix(".manifest"): p.read_text() for p in paths}


def layer_files(
    wheel: Path, deps: list[Path], lock_text: str, manifests: dict[str, str] | None = None
) -> list[FileSpec]:
    wheel_hash = hashlib.sha256(wheel.read_bytes()).hexdigest()
    name, version = wheel.name.split("-")[:2]
    requirements = lock_text + f"{name.replace('_', '-')}=={version} \\\n    --hash=sha256:{wheel_hash}\n"
    files = [FileSpec(f"{PREFIX}/wheels/{w.name}", w.read_bytes()) for w in [*deps, wheel]]
    files.append(FileSpec(f"{PREFIX}/requirements.txt", requirements.encode()))
    files.append(FileSpec(f"{PREFIX}/bin/entrypoint", ENTRYPOINT.encode(), 0o755))
    # Standard-library scripts the compose runs before and beside the server (see their docstrings).
    for script, path in (("fetch-model", "fetch_model.py"), ("healthcheck", "healthcheck.py")):
        files.append(FileSpec(f"{PREFIX}/bin/{script}", (REPO / "image" / path).read_bytes(), 0o755))
    for model, text in (model_manifests() if manifests is None else manifests).items():
        files.append(FileSpec(f"{PREFIX}/models/{model}.manifest", text.encode()))
    return files


def _annotations(base: Base) -> dict[str, str]:
    return {
        "org.opencontainers.image.base.name": f"{base.name}:{base.tag}",
        "org.opencontainers.image.base.digest": base.digest,
        "org.opencontainers.image.source": SOURCE_REPOSITORY,
    }


def assemble(
    files: list[FileSpec],
    base: Base,
    epoch: int,
    compression: str = "none",
    stacked_on: BaseImage | None = None,
) -> Image:
    """The image for a layer's files: stacked on the base when it is given, else our layer alone
    (whose manifest names the base by the standard OCI annotations but cannot run by itself)."""
    tar = layer_tar(files, epoch)
    comment = f"tee-inference application layer on {base.reference}"
    if stacked_on is not None:
        diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
        return stack(
            stacked_on,
            compress(tar, compression),
            diff_id,
            entrypoint=[f"{PREFIX}/bin/entrypoint"],
            exposed_ports=[f"{PORT}/tcp"],
            epoch=epoch,
            annotations=_annotations(base),
            history_comment=comment,
        )
    config = {
        "Entrypoint": [f"{PREFIX}/bin/entrypoint"],
        "ExposedPorts": {f"{PORT}/tcp": {}},
        "Labels": {"org.opencontainers.image.base.digest": base.digest},
    }
    return build_image(
        [tar],
        image_config=config,
        created=epoch,
        annotations=_annotations(base),
        compression=compression,
        history_comment=comment,
    )


def base_layout(given: Path | None) -> Path | None:
    """The base to stack on: the one given, else the digest-only import in image/base/, else none."""
    if given is not None:
        return given
    return BASE_IMPORT if (BASE_IMPORT / "index.json").is_file() else None


@dataclass(frozen=True)
class Built:
    image: Image
    stacked: bool  # the runnable image (base layers + ours), not our layer alone
    base_layers_included: bool  # the output layout holds the base's layer blobs (pushable)

    @property
    def digest(self) -> str:
        return self.image.digest

    def describe(self, base: Base) -> str:
        if not self.stacked:
            return f"{self.digest}  our layer ALONE (not runnable: give a base layout, make image BASE=DIR)"
        where = "with" if self.base_layers_included else "WITHOUT"
        where += " the base's layer blobs in the layout"
        return f"{self.digest}  runnable image: {base.reference} + our layer ({where})"


def build(
    out: Path,
    cache: Path,
    compression: str = "none",
    rootfs: Path | None = None,
    *,
    base_dir: Path | None = None,
    manifests: dict[str, str] | None = None,
) -> Built:
    """Build the layer and the image; ``base_dir`` is a base layout (default: ``base_layout(None)``)."""
    base = read_base(REPO / "image" / "Containerfile")
    layout = base_layout(base_dir)
    stacked_on = read_base_layout(layout, base.digest) if layout is not None else None
    epoch = source_date_epoch()
    lock = REPO / "requirements" / "runtime.txt"
    with tempfile.TemporaryDirectory(prefix="tee-image-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(cache, epoch, work)
        deps = download_dependencies(lock, work)
        files = layer_files(wheel, deps, lock.read_text(), manifests)
        image = assemble(files, base, epoch, compression, stacked_on)
    if rootfs is not None:  # the same files as a plain tree: the Containerfile's build context
        for spec in files:
            target = rootfs / spec.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(spec.data)
            target.chmod(spec.mode)
    write_layout(image, out, ref_name="latest")
    included = stacked_on is not None and stacked_on.layers_present
    if stacked_on is not None and included:
        link_base_layers(stacked_on, out)
    (out / "digest").write_text(image.digest + "\n")
    return Built(image, stacked_on is not None, included)


def wheel_set(out: Path, cache: Path, python_version: str) -> list[FileSpec]:
    """The layer's files with dependency wheels for ``python_version``, written as a tree under ``out``
    (what the image holds under /opt/tee-inference when built for that interpreter)."""
    epoch = source_date_epoch()
    lock = REPO / "requirements" / "runtime.txt"
    with tempfile.TemporaryDirectory(prefix="tee-wheels-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(cache, epoch, work)
        deps = download_dependencies(lock, work, python_version)
        files = layer_files(wheel, deps, lock.read_text())
    for spec in files:
        target = out / spec.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(spec.data)
        target.chmod(spec.mode)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="image/build_image.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "image-cache")
    parser.add_argument("--compression", choices=["none", "gzip"], default="none")
    commands = parser.add_subparsers(dest="command", required=True)
    base_help = "OCI layout of the pinned base (default: $BASE, else image/base/ if imported)"
    build_cmd = commands.add_parser("build")
    build_cmd.add_argument("--out", type=Path, default=REPO / "build" / "image")
    build_cmd.add_argument(
        "--rootfs", type=Path, help="also write the layer's files here (Containerfile context)"
    )
    build_cmd.add_argument("--base-layout", type=Path, help=base_help)
    repro = commands.add_parser("reproduce")
    repro.add_argument("--base-layout", type=Path, help=base_help)
    wheels = commands.add_parser("wheels", help="the layer's files, dependency wheels for another Python")
    wheels.add_argument("--python-version", required=True, metavar="X.Y")
    wheels.add_argument("--out", type=Path, required=True)
    imp = commands.add_parser("import-base", help="keep the base's index/manifest/config in image/base/")
    imp.add_argument("layout", type=Path, help="OCI layout of the pinned base (skopeo copy --all …)")
    comp = commands.add_parser("compose")
    comp.add_argument("--digest", help="image digest (default: build it)")
    comp.add_argument("--model", default="SmolLM2-135M-Instruct", help="served model (a /models directory)")
    comp.add_argument("--weights-root", required=True, help="expected weights root passed to the server")
    comp.add_argument("--out", type=Path, default=REPO / "image" / "app-compose.json")
    args = parser.parse_args(argv)
    from_env = Path(os.environ["BASE"]) if os.environ.get("BASE") else None
    given = getattr(args, "base_layout", None) or from_env
    base = read_base(REPO / "image" / "Containerfile")
    try:
        if args.command == "build":
            built = build(args.out, args.cache, args.compression, args.rootfs, base_dir=given)
            print(built.describe(base))
        elif args.command == "reproduce":
            digests = []
            for _ in range(2):
                with tempfile.TemporaryDirectory(prefix="tee-reproduce-") as tmp:
                    built = build(Path(tmp) / "image", Path(tmp) / "cache", args.compression, base_dir=given)
                    digests.append(built.digest)
                    print(f"build {len(digests)}: {built.describe(base)}")
            if digests[0] != digests[1]:
                print("NOT REPRODUCIBLE: the two builds differ", file=sys.stderr)
                return 1
            print(f"reproducible: {digests[0]}")
        elif args.command == "import-base":
            kept = import_base(read_base_layout(args.layout, base.digest), BASE_IMPORT)
            print(f"image/base/: {', '.join(kept)} (commit it; make image now stacks on it)")
        elif args.command == "wheels":
            files = wheel_set(args.out, args.cache, args.python_version)
            print(f"{len(files)} files for CPython {args.python_version} under {args.out}{PREFIX}")
        else:
            digest = args.digest or build(REPO / "build" / "image", args.cache, args.compression).digest
            text = compose_text(f"{IMAGE_REPOSITORY}@{digest}", args.model, args.weights_root)
            args.out.write_text(text)
            print(f"compose_hash {compose_hash(text)}  ({args.out})")
    except (BuildError, StackError, subprocess.CalledProcessError) as exc:
        print(f"image/build_image.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
