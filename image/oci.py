"""A small, deterministic writer of OCI image layouts (stdlib only).

Why by hand: Debian ships buildah 1.28 and umoci 0.4.7, but neither gives a
bit-identical result here. buildah needs a container storage driver and user
namespaces (root or newuidmap) even for a COPY-only build, and stamps build-host
times into history unless every option is right; umoci reads mtimes and owners from
an unpacked rootfs and needs rootless namespaces to write one. Both compress layers
with Go's gzip, so the blob digest is tied to the Go version of the tool. What we
need is small: one tar of files we choose, a config and a manifest, all
canonical. Writing them here makes every byte a function of the inputs:

* tar entries sorted by path, parents before children, uid/gid 0 with empty owner
  names, modes 0644/0755, every mtime = SOURCE_DATE_EPOCH, PAX format (long wheel
  names) with no per-file PAX time records;
* the layer is stored **uncompressed** by default (media type ``...layer.v1.tar``,
  valid OCI that docker, podman and containerd pull). The payload is wheels, which are
  zip files already, so gzip would save little, and gzip output depends on the zlib
  build (zlib-ng, as shipped by Fedora, emits different bytes), which would tie the
  digest to the auditor's distribution. ``compression="gzip"`` (mtime 0, no file
  name, level 9) is available where a registry insists on it;
* JSON is written with sorted keys and no whitespace.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class FileSpec:
    """One file of a layer: its absolute path in the image, content and mode."""

    path: str
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        desc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}
        if annotations:
            desc["annotations"] = dict(annotations)
        return desc


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def iso_time(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def layer_tar(files: Sequence[FileSpec], mtime: int) -> bytes:
    """An uncompressed tar of ``files`` plus every parent directory, in canonical order."""
    entries: dict[str, FileSpec | None] = {}
    for spec in files:
        name = spec.path.strip("/")
        if not name or ".." in name.split("/") or name in entries:
            raise ValueError(f"bad or duplicate layer path: {spec.path!r}")
        entries[name] = spec
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if isinstance(entries.get(parent), FileSpec):
                raise ValueError(f"{parent} is both a file and a directory")
            entries.setdefault(parent, None)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries, key=lambda n: n.encode("utf-8")):
            entry = entries[name]
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if entry is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = entry.mode
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    return out.getvalue()


def compress(tar_bytes: bytes, compression: str) -> Blob:
    if compression == "none":
        return Blob(MEDIA_LAYER_TAR, tar_bytes)
    if compression == "gzip":
        out = io.BytesIO()
        # filename="" and mtime=0 keep the gzip header free of build-host facts.
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
            gz.write(tar_bytes)
        return Blob(MEDIA_LAYER_GZIP, out.getvalue())
    raise ValueError(f"unknown compression {compression!r}")


@dataclass(frozen=True)
class Image:
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest


def build_image(
    layer_tars: Sequence[bytes],
    *,
    image_config: Mapping[str, Any],
    created: int,
    annotations: Mapping[str, str],
    compression: str = "none",
    history_comment: str = "",
) -> Image:
    """Config and manifest for ``layer_tars``; ``image_config`` is the OCI ``config`` object."""
    layers = tuple(compress(t, compression) for t in layer_tars)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": iso_time(created),
        "config": dict(image_config),
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in layer_tars],
        },
        "history": [
            {"created": iso_time(created), "created_by": "image/build_image.py", "comment": history_comment}
            for _ in layer_tars
        ],
    }
    config_blob = Blob(MEDIA_CONFIG, canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
        "annotations": dict(annotations),
    }
    return Image(Blob(MEDIA_MANIFEST, canonical_json(manifest)), config_blob, layers)


def write_layout(image: Image, out: Path, ref_name: str) -> None:
    """Write an OCI image layout (oci-layout, index.json, blobs/sha256/…) into ``out``."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for blob in (image.manifest, image.config, *image.layers):
        (blobs / blob.digest.removeprefix("sha256:")).write_bytes(blob.data)
    (out / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [image.manifest.descriptor({"org.opencontainers.image.ref.name": ref_name})],
    }
    (out / "index.json").write_bytes(canonical_json(index))
