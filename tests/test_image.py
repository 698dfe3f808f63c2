"""The reproducible image writer and the deployment descriptor, on small fixed inputs.

The full build (our wheel + the locked dependency wheels) runs in `make reproduce`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from support.paths import REPO

IMAGE_DIR = REPO / "image"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, IMAGE_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


oci = _load("oci")
build = _load("build_image")

EPOCH = 1_700_000_000
BASE = build.Base("docker.io/vllm/vllm-openai", "v0.14.0", "sha256:" + "ab" * 32)


def _files(payload: bytes = b"wheel bytes") -> list:
    return [
        oci.FileSpec("/opt/tee-inference/wheels/b-1.0-py3-none-any.whl", payload),
        oci.FileSpec("/opt/tee-inference/wheels/a-" + "x" * 120 + ".whl", b"long name"),
        oci.FileSpec("/opt/tee-inference/requirements.txt", b"a==1 --hash=sha256:00\n"),
        oci.FileSpec("/opt/tee-inference/bin/entrypoint", b"#!/bin/sh\n", 0o755),
    ]


def _image(payload: bytes = b"wheel bytes", compression: str = "none"):
    return build.assemble(_files(payload), BASE, EPOCH, compression)


def test_same_inputs_same_digest(tmp_path: Path) -> None:
    first, second = _image(), _image()
    assert first.digest == second.digest
    oci.write_layout(first, tmp_path / "a", "c0ffee")
    oci.write_layout(second, tmp_path / "b", "c0ffee")
    for rel in [
        "oci-layout",
        "index.json",
        *[f"blobs/sha256/{p.name}" for p in (tmp_path / "a/blobs/sha256").iterdir()],
    ]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_one_byte_changes_digest(compression: str) -> None:
    assert _image(b"wheel bytes", compression).digest != _image(b"wheel bytez", compression).digest
    assert _image(compression=compression).digest == _image(compression=compression).digest


def test_order_irrelevant_epoch_and_base_relevant() -> None:
    shuffled = build.assemble(list(reversed(_files())), BASE, EPOCH)
    assert shuffled.digest == _image().digest
    assert build.assemble(_files(), BASE, EPOCH + 1).digest != _image().digest
    other_base = build.Base(BASE.name, BASE.tag, "sha256:" + "cd" * 32)
    assert build.assemble(_files(), other_base, EPOCH).digest != _image().digest


def test_layer_tar_is_canonical() -> None:
    image = _image()
    with tarfile.open(fileobj=io.BytesIO(image.layers[0].data)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names, key=str.encode)
    assert names[:2] == ["opt", "opt/tee-inference"]
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)
    assert all(m.mtime == EPOCH for m in members)
    modes = {m.name: m.mode for m in members}
    assert modes["opt/tee-inference/bin/entrypoint"] == 0o755
    assert modes["opt/tee-inference/requirements.txt"] == 0o644
    assert modes["opt/tee-inference/wheels"] == 0o755


def test_layout_structure(tmp_path: Path) -> None:
    image = _image(compression="gzip")
    oci.write_layout(image, tmp_path, "c0ffee")
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.digest
    manifest_bytes = (tmp_path / "blobs/sha256" / image.digest.removeprefix("sha256:")).read_bytes()
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == image.digest
    manifest = json.loads(manifest_bytes)
    assert manifest["annotations"]["org.opencontainers.image.base.digest"] == BASE.digest
    layer = manifest["layers"][0]
    assert layer["mediaType"] == oci.MEDIA_LAYER_GZIP
    data = (tmp_path / "blobs/sha256" / layer["digest"].removeprefix("sha256:")).read_bytes()
    assert data[4:8] == b"\0\0\0\0"  # gzip mtime 0
    assert data[3] & 0x08 == 0  # no file name
    config = json.loads((tmp_path / "blobs/sha256" / manifest["config"]["digest"][7:]).read_text())
    assert config["config"]["Entrypoint"] == ["/opt/tee-inference/bin/entrypoint"]

    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()]
    assert config["created"] == "2023-11-14T22:13:20Z"


def test_bad_layer_paths_refused() -> None:
    with pytest.raises(ValueError):
        oci.layer_tar([oci.FileSpec("/a/../b", b"")], EPOCH)
    with pytest.raises(ValueError):
        oci.layer_tar([oci.FileSpec("/a", b""), oci.FileSpec("/a/b", b"")], EPOCH)


def test_containerfile_base_is_pinned(tmp_path: Path) -> None:
    base = build.read_base(IMAGE_DIR / "Containerfile")
    assert base.name == "docker.io/vllm/vllm-openai"
    assert base.digest.startswith("sha256:") and len(base.digest) == 71
    unpinned = tmp_path / "Containerfile"
    unpinned.write_text("FROM docker.io/vllm/vllm-openai:v0.14.0\n")
    with pytest.raises(build.BuildError, match="not pinned"):
        build.read_base(unpinned)


def test_compose_hash_is_sha256_of_exact_bytes() -> None:
    text = build.compose_text("ghcr.io/x/y@sha256:" + "cd" * 32, "m", "ab" * 32)
    app = json.loads(text)
    assert app["manifest_version"] == 2 and app["runner"] == "docker-compose"
    assert '"image": "ghcr.io/x/y@sha256:' + "cd" * 32 + '"' in app["docker_compose_file"]
    assert build.compose_hash(text) == hashlib.sha256(text.encode()).hexdigest()
    other = build.compose_text("ghcr.io/x/y@sha256:" + "ce" * 32, "m", "ab" * 32)
    assert build.compose_hash(other) != build.compose_hash(text)
