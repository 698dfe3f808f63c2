"""Stacking our layer onto the pinned base: a small base layout this test builds, read and stacked.

The base here has the shape `skopeo copy --all --preserve-digests` leaves: an index.json naming
a Docker manifest list (amd64 and arm64), only the amd64 image's blobs present, Docker media types.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from test_image import BASE, EPOCH, _files, build, oci

stack = build.sys.modules["stack"]

BASE_CREATED = "2026-01-02T03:04:05Z"


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _put(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_base(layout: Path, *, single: bool = False) -> str:
    """A two-layer 'vLLM' base; returns the digest to pin (the list's, or the manifest's)."""
    tars = [_tar({"usr/bin/python3": b"#!python\n"}), _tar({"usr/local/bin/vllm": b"#!vllm\n"})]
    layers = [
        {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            **_put(layout, gzip.compress(t, mtime=0)),
        }
        for t in tars
    ]
    config = {
        "architecture": "amd64", "os": "linux", "created": BASE_CREATED,
        "config": {"Entrypoint": ["vllm", "serve"], "Cmd": ["--help"], "Env": ["PATH=/usr/local/bin:/usr/bin"],
                   "ExposedPorts": {"8000/tcp": {}}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]},
        "history": [{"created_by": "RUN a"}, {"created_by": "RUN b"}],
    }  # fmt: skip
    config_desc = {"mediaType": "application/vnd.docker.container.image.v1+json",
                   **_put(layout, json.dumps(config).encode())}  # fmt: skip
    manifest = {
        "schemaVersion": 2,
        "mediaType": stack.DOCKER_MANIFEST,
        "config": config_desc,
        "layers": layers,
    }
    manifest_desc = {
        "mediaType": stack.DOCKER_MANIFEST,
        **_put(layout, json.dumps(manifest, indent=3).encode()),
    }
    if single:
        top = manifest_desc
    else:
        other = {"mediaType": stack.DOCKER_MANIFEST, "digest": "sha256:" + "ee" * 32, "size": 1234,
                 "platform": {"architecture": "arm64", "os": "linux"}}  # fmt: skip
        listing = {"schemaVersion": 2, "mediaType": stack.DOCKER_LIST, "manifests": [
            other, {**manifest_desc, "platform": {"architecture": "amd64", "os": "linux"}}]}  # fmt: skip
        top = {"mediaType": stack.DOCKER_LIST, **_put(layout, json.dumps(listing).encode())}
    index = {
        "schemaVersion": 2,
        "manifests": [{**top, "annotations": {"org.opencontainers.image.ref.name": "b"}}],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return str(top["digest"])


@pytest.fixture
def base_layout(tmp_path: Path) -> tuple[Path, str]:
    layout = tmp_path / "base"
    return layout, make_base(layout)


def _stacked(layout: Path, pinned: str, payload: bytes = b"wheel bytes") -> Any:
    base = build.Base(BASE.name, BASE.tag, pinned)
    return build.assemble(_files(payload), base, EPOCH, stacked_on=stack.read_base_layout(layout, pinned))


def test_stacked_manifest_and_config(base_layout: tuple[Path, str]) -> None:
    layout, pinned = base_layout
    base = stack.read_base_layout(layout, pinned)
    image = _stacked(layout, pinned)
    manifest = json.loads(image.manifest.data)
    config = json.loads(image.config.data)
    ours = image.layers[0]

    assert manifest["mediaType"] == oci.MEDIA_MANIFEST
    assert [d["digest"] for d in manifest["layers"]] == [*[d["digest"] for d in base.layers], ours.digest]
    assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert manifest["config"]["digest"] == image.config.digest
    assert manifest["annotations"]["org.opencontainers.image.base.digest"] == pinned
    base_config = json.loads(base.config_bytes)
    assert config["rootfs"]["diff_ids"] == [*base_config["rootfs"]["diff_ids"], "sha256:" + hashlib.sha256(
        oci.layer_tar(_files(), EPOCH)).hexdigest()]  # fmt: skip
    assert config["config"]["Entrypoint"] == ["/opt/tee-inference/bin/entrypoint"]
    assert "Cmd" not in config["config"], "the base's CMD would become our entrypoint's arguments"
    assert config["config"]["Env"] == base_config["config"]["Env"], "the base's PATH etc. are kept"
    assert set(config["config"]["ExposedPorts"]) == {"8000/tcp", "8443/tcp"}
    assert len(config["history"]) == 3 and config["created"] == BASE_CREATED


def test_stacking_is_deterministic_and_sensitive(base_layout: tuple[Path, str], tmp_path: Path) -> None:
    layout, pinned = base_layout
    first, second = _stacked(layout, pinned), _stacked(layout, pinned)
    assert first.digest == second.digest
    assert _stacked(layout, pinned, b"wheel bytez").digest != first.digest
    other = tmp_path / "other-base"
    assert _stacked(other, make_base(other, single=True)).digest != first.digest
    # The stacked image is not our layer alone.
    assert build.assemble(_files(), build.Base(BASE.name, BASE.tag, pinned), EPOCH).digest != first.digest


def test_runnable_rootfs(base_layout: tuple[Path, str], tmp_path: Path) -> None:
    """Unpacking the layers in manifest order gives the base's files and ours; the entrypoint exists."""
    layout, pinned = base_layout
    image = _stacked(layout, pinned)
    out = tmp_path / "out"
    oci.write_layout(image, out, "latest")
    assert stack.link_base_layers(stack.read_base_layout(layout, pinned), out) == 2
    manifest = json.loads((out / "blobs/sha256" / image.digest[7:]).read_bytes())
    rootfs = tmp_path / "rootfs"
    for descriptor in manifest["layers"]:
        data = (out / "blobs/sha256" / descriptor["digest"][7:]).read_bytes()
        if descriptor["mediaType"].endswith("+gzip"):
            data = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(rootfs, filter="data")
    config = json.loads((out / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    assert (rootfs / config["config"]["Entrypoint"][0].lstrip("/")).is_file()
    assert (rootfs / "usr/local/bin/vllm").is_file()


def test_single_manifest_base(tmp_path: Path) -> None:
    layout = tmp_path / "base"
    pinned = make_base(layout, single=True)
    assert stack.read_base_layout(layout, pinned).manifest_digest == pinned


def test_wrong_or_tampered_base_is_refused(base_layout: tuple[Path, str]) -> None:
    layout, pinned = base_layout
    with pytest.raises(stack.StackError, match="does not hold the pinned base"):
        stack.read_base_layout(layout, "sha256:" + "ab" * 32)
    base = stack.read_base_layout(layout, pinned)
    config = base.blob_path(base.manifest["config"]["digest"])
    config.write_bytes(config.read_bytes().replace(b"vllm", b"evil"))
    with pytest.raises(stack.StackError, match="does not hash to its name"):
        stack.read_base_layout(layout, pinned)


def test_import_base_gives_the_same_digest(base_layout: tuple[Path, str], tmp_path: Path) -> None:
    """image/base/ (index, manifest, config; no layers) stacks to the same digest as the full layout."""
    layout, pinned = base_layout
    imported = tmp_path / "imported"
    kept = stack.import_base(stack.read_base_layout(layout, pinned), imported)
    assert len(kept) == 3
    small = stack.read_base_layout(imported, pinned)
    assert not small.layers_present and stack.read_base_layout(layout, pinned).layers_present
    assert _stacked(imported, pinned).digest == _stacked(layout, pinned).digest


def test_build_with_base_layout(base_layout: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`build_image.py build --base-layout` end to end (our real wheel and locked wheels)."""
    layout, pinned = base_layout
    monkeypatch.setattr(build, "read_base", lambda _: build.Base(BASE.name, BASE.tag, pinned))
    cache = build.REPO / "build" / "image-cache"
    assert (
        build.main(
            ["--cache", str(cache), "build", "--out", str(tmp_path / "img"), "--base-layout", str(layout)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    digest = (tmp_path / "img" / "digest").read_text().strip()
    assert printed.startswith(f"{digest}  runnable image: ") and "with the base's layer blobs" in printed
    assert (
        build.main(
            ["--cache", str(cache), "build", "--out", str(tmp_path / "img2"), "--base-layout", str(layout)]
        )
        == 0
    )
    assert (tmp_path / "img2" / "digest").read_text().strip() == digest
