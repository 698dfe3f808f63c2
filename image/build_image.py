"""Reproducible build of our application layer, and the dstack deployment descriptor.

    python image/build_image.py build [--out build/image]     # OCI layout, prints the manifest digest
    python image/build_image.py reproduce                      # two builds in fresh temp dirs, same digest?
    python image/build_image.py compose                        # writes image/app-compose.json

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
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oci import FileSpec, Image, build_image, layer_tar, write_layout

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/opt/tee-inference"
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
SOURCE_REPOSITORY = "https://github.com/tee-inference/tee-inference"
IMAGE_REPOSITORY = "ghcr.io/tee-inference/tee-inference"
WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "server")
FROM_LINE = re.compile(
    r"^FROM\s+(?P<name>[^\s:@]+(?::\d+)?/[^\s:@]+):(?P<tag>[\w.-]+)@(?P<digest>sha256:[0-9a-f]{64})\s*$"
)

ENTRYPOINT = f"""#!/bin/sh
# Installs the measured wheels offline (no index; every file checked against the lock's
# sha256) into the image's Python, then runs the signing server in front of vLLM with
# the TDX trust roots. Arguments (model, expected weights root) come from app-compose.
set -eu
python3 -m pip install --quiet --no-index --no-deps --require-hashes \\
    --find-links {PREFIX}/wheels -r {PREFIX}/requirements.txt
exec tee-inference serve --engine vllm --tee tdx --host 0.0.0.0 --port 8000 "$@"
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


def download_dependencies(lock: Path, work: Path) -> list[Path]:
    """The lock's wheels for the image's Python; pip refuses any file whose hash is not in the lock."""
    out = work / "deps"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--require-hashes", "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp"]
    cmd += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([*cmd, "-d", str(out), "-r", str(lock)], check=True)
    return sorted(out.glob("*.whl"))


def layer_files(wheel: Path, deps: list[Path], lock_text: str) -> list[FileSpec]:
    wheel_hash = hashlib.sha256(wheel.read_bytes()).hexdigest()
    name, version = wheel.name.split("-")[:2]
    requirements = lock_text + f"{name.replace('_', '-')}=={version} \\\n    --hash=sha256:{wheel_hash}\n"
    files = [FileSpec(f"{PREFIX}/wheels/{w.name}", w.read_bytes()) for w in [*deps, wheel]]
    files.append(FileSpec(f"{PREFIX}/requirements.txt", requirements.encode()))
    files.append(FileSpec(f"{PREFIX}/bin/entrypoint", ENTRYPOINT.encode(), 0o755))
    return files


def assemble(files: list[FileSpec], base: Base, epoch: int, compression: str = "none") -> Image:
    """The image for a layer's files. The base's layers are not pulled here: the manifest
    names the base by the standard OCI annotations, and the digest we publish is this one."""
    config = {
        "Entrypoint": [f"{PREFIX}/bin/entrypoint"],
        "ExposedPorts": {"8000/tcp": {}},
        "Labels": {"org.opencontainers.image.base.digest": base.digest},
    }
    annotations = {
        "org.opencontainers.image.base.name": f"{base.name}:{base.tag}",
        "org.opencontainers.image.base.digest": base.digest,
        "org.opencontainers.image.source": SOURCE_REPOSITORY,
    }
    tar = layer_tar(files, epoch)
    return build_image(
        [tar],
        image_config=config,
        created=epoch,
        annotations=annotations,
        compression=compression,
        history_comment=f"tee-inference application layer on {base.reference}",
    )


def build(out: Path, cache: Path, compression: str = "none", rootfs: Path | None = None) -> Image:
    base = read_base(REPO / "image" / "Containerfile")
    epoch = source_date_epoch()
    lock = REPO / "requirements" / "runtime.txt"
    with tempfile.TemporaryDirectory(prefix="tee-image-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(cache, epoch, work)
        deps = download_dependencies(lock, work)
        files = layer_files(wheel, deps, lock.read_text())
        image = assemble(files, base, epoch, compression)
    if rootfs is not None:  # the same files as a plain tree: the Containerfile's build context
        for spec in files:
            target = rootfs / spec.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(spec.data)
            target.chmod(spec.mode)
    write_layout(image, out, ref_name="latest")
    (out / "digest").write_text(image.digest + "\n")
    return image


def compose_text(image_ref: str, model_args: list[str]) -> str:
    """dstack app-compose (manifest_version 2); compose_hash = sha256 of exactly these bytes."""
    compose = (
        "services:\n"
        "  tee-inference:\n"
        f"    image: {image_ref}\n"
        "    restart: always\n"
        "    ports:\n"
        '      - "8000:8000"\n'
        "    volumes:\n"
        "      - /var/run/dstack.sock:/var/run/dstack.sock\n"
        "      - /models:/models:ro\n"
        "    devices:\n"
        "      - /dev/tdx_guest:/dev/tdx_guest\n"
        "    runtime: nvidia\n"
        f"    command: {json.dumps(model_args)}\n"
    )
    app = {
        "manifest_version": 2,
        "name": "tee-inference",
        "runner": "docker-compose",
        "docker_compose_file": compose,
        "kms_enabled": True,
        "gateway_enabled": False,
        "local_key_provider_enabled": False,
        "public_logs": True,
        "public_sysinfo": True,
        "public_tcbinfo": True,
        "no_instance_id": False,
        "secure_time": True,
        "allowed_envs": [],
        "pre_launch_script": "",
    }
    return json.dumps(app, indent=2, sort_keys=True) + "\n"


def compose_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="image/build_image.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "image-cache")
    parser.add_argument("--compression", choices=["none", "gzip"], default="none")
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build")
    build_cmd.add_argument("--out", type=Path, default=REPO / "build" / "image")
    build_cmd.add_argument(
        "--rootfs", type=Path, help="also write the layer's files here (Containerfile context)"
    )
    commands.add_parser("reproduce")
    comp = commands.add_parser("compose")
    comp.add_argument("--digest", help="image digest (default: build it)")
    comp.add_argument("--model", default="/models/SmolLM2-135M-Instruct")
    comp.add_argument("--weights-root", help="expected weights root passed to the server")
    comp.add_argument("--out", type=Path, default=REPO / "image" / "app-compose.json")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build(args.out, args.cache, args.compression, args.rootfs).digest)
        elif args.command == "reproduce":
            digests = []
            for _ in range(2):
                with tempfile.TemporaryDirectory(prefix="tee-reproduce-") as tmp:
                    digests.append(build(Path(tmp) / "image", Path(tmp) / "cache", args.compression).digest)
                    print(f"build {len(digests)}: {digests[-1]}")
            if digests[0] != digests[1]:
                print("NOT REPRODUCIBLE: the two builds differ", file=sys.stderr)
                return 1
            print(f"reproducible: {digests[0]}")
        else:
            digest = args.digest or build(REPO / "build" / "image", args.cache, args.compression).digest
            model_args = ["--model", args.model]
            if args.weights_root:
                model_args += ["--expect-weights-root", args.weights_root]
            text = compose_text(f"{IMAGE_REPOSITORY}@{digest}", model_args)
            args.out.write_text(text)
            print(f"compose_hash {compose_hash(text)}  ({args.out})")
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(f"image/build_image.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
