"""Stack our application layer onto the pinned base image: one runnable image, one digest.

The base comes as an OCI image layout directory, made on a connected machine with

    skopeo copy --all --preserve-digests \\
        docker://docker.io/vllm/vllm-openai:v0.31.0@sha256:<pinned> oci:build/base-layout:v0.31.0

(``--all`` keeps the manifest list the Containerfile pins; ``--preserve-digests`` makes skopeo
fail rather than convert a Docker-format manifest to OCI, which would change its digest). The
layout's ``index.json`` must name the pinned digest, either a manifest list / OCI index (we take
its linux/amd64 manifest) or a single manifest. Every JSON blob we read is checked against its
digest, so the layout directory itself need not be trusted.

The stacked image, byte for byte a function of (base manifest, base config, our layer)::

    manifest  schemaVersion 2, OCI media type
      config  -> the base's config JSON with, changed:
                   config.Entrypoint = ours, config.Cmd removed (as a Dockerfile ENTRYPOINT does),
                   config.ExposedPorts += ours, config.Labels += base digest,
                   rootfs.diff_ids += our layer's, history += one entry for our layer
      layers  -> the base's layer descriptors (Docker media types mapped to their OCI names,
                 digest and size unchanged), then our layer
      annotations: base name and digest, source repository

Base layer blobs are only needed to push the result: they are linked (or copied) into the
output layout when the base layout has them. Only their descriptors enter the digest, so the
digest can be computed from a layout that holds just the base's index, manifest and config
(what ``make pin-base`` imports into ``image/base/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oci import MEDIA_CONFIG, MEDIA_MANIFEST, Blob, Image, canonical_json, iso_time

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
INDEXES = frozenset({DOCKER_LIST, OCI_INDEX})
MANIFESTS = frozenset({DOCKER_MANIFEST, MEDIA_MANIFEST})
# Docker's layer media types and their OCI names (same bytes, same digest).
LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.v1.tar": "application/vnd.oci.image.layer.v1.tar",
}
PLATFORM = {"os": "linux", "architecture": "amd64"}


class StackError(Exception):
    """The base layout is unusable or is not the pinned base; the message says how to fix it."""


@dataclass(frozen=True)
class BaseImage:
    """The pinned base as read from a layout: its (platform) manifest and config, digest-checked."""

    layout: Path
    pinned: str  # the digest the Containerfile pins (manifest list or manifest)
    manifest: dict[str, Any]
    manifest_digest: str
    config_bytes: bytes

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("layers", []))

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return self.layout / "blobs" / algorithm / hexdigest

    @property
    def layers_present(self) -> bool:
        return all(self.blob_path(str(d["digest"])).is_file() for d in self.layers)


def _blob(layout: Path, digest: str) -> bytes:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64:
        raise StackError(f"{layout}: unsupported digest {digest!r}")
    path = layout / "blobs" / algorithm / hexdigest
    try:
        data = path.read_bytes()
    except OSError:
        raise StackError(f"{layout}: blob {digest} is missing") from None
    if hashlib.sha256(data).hexdigest() != hexdigest:
        raise StackError(f"{layout}: blob {digest} does not hash to its name (corrupt or tampered)")
    return data


def _json(layout: Path, digest: str) -> dict[str, Any]:
    try:
        value = json.loads(_blob(layout, digest))
    except ValueError:
        raise StackError(f"{layout}: blob {digest} is not JSON") from None
    if not isinstance(value, dict):
        raise StackError(f"{layout}: blob {digest} is not a JSON object")
    return value


def _media_type(descriptor: Mapping[str, Any], document: Mapping[str, Any]) -> str:
    return str(document.get("mediaType") or descriptor.get("mediaType") or "")


def read_base_layout(layout: Path, pinned: str) -> BaseImage:
    """The linux/amd64 image of the pinned base in ``layout``; StackError if it is not there."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as exc:
        raise StackError(f"{layout} is not an OCI image layout (index.json: {exc})") from None
    found = [d for d in index.get("manifests", []) if d.get("digest") == pinned]
    if not found:
        named = ", ".join(str(d.get("digest")) for d in index.get("manifests", [])) or "nothing"
        raise StackError(
            f"{layout} does not hold the pinned base {pinned} (its index.json names {named}); copy it with "
            "`skopeo copy --all --preserve-digests docker://…@" + pinned + " oci:DIR`"
        )
    document = _json(layout, pinned)
    kind = _media_type(found[0], document)
    manifest_digest = pinned
    if kind in INDEXES:
        entries = [
            m for m in document.get("manifests", [])
            if {k: (m.get("platform") or {}).get(k) for k in PLATFORM} == PLATFORM
        ]  # fmt: skip
        if len(entries) != 1:
            raise StackError(f"{layout}: the base index {pinned} has {len(entries)} linux/amd64 manifests")
        manifest_digest = str(entries[0]["digest"])
        document = _json(layout, manifest_digest)
        kind = _media_type(entries[0], document)
    if kind not in MANIFESTS:
        what = kind or "document without mediaType"
        raise StackError(f"{layout}: {manifest_digest} is a {what}, not a manifest")
    for layer in document.get("layers", []):
        if layer.get("mediaType") not in LAYER_TYPES:
            kind = layer.get("mediaType")
            raise StackError(f"{layout}: base layer {layer.get('digest')} has media type {kind!r}")
    config = _blob(layout, str(document["config"]["digest"]))
    return BaseImage(layout, pinned, document, manifest_digest, config)


def stack(
    base: BaseImage,
    layer: Blob,
    diff_id: str,
    *,
    entrypoint: Sequence[str],
    exposed_ports: Sequence[str],
    epoch: int,
    annotations: Mapping[str, str],
    history_comment: str,
) -> Image:
    """The base's layers then ``layer``; the base's config with our entrypoint and ``diff_id``."""
    config = json.loads(base.config_bytes)
    runtime = dict(config.get("config") or {})
    runtime["Entrypoint"] = list(entrypoint)
    runtime.pop("Cmd", None)  # the base's CMD would become arguments of our entrypoint
    runtime["ExposedPorts"] = {**(runtime.get("ExposedPorts") or {}), **{p: {} for p in exposed_ports}}
    runtime["Labels"] = {**(runtime.get("Labels") or {}), "org.opencontainers.image.base.digest": base.pinned}
    config["config"] = runtime
    rootfs = dict(config.get("rootfs") or {"type": "layers"})
    diff_ids = list(rootfs.get("diff_ids") or [])
    if len(diff_ids) != len(base.layers):
        raise StackError(f"base config has {len(diff_ids)} diff_ids for {len(base.layers)} layers")
    rootfs["diff_ids"] = [*diff_ids, diff_id]
    config["rootfs"] = rootfs
    history = list(config.get("history") or [])
    history.append(
        {"created": iso_time(epoch), "created_by": "image/build_image.py", "comment": history_comment}
    )
    config["history"] = history
    config_blob = Blob(MEDIA_CONFIG, canonical_json(config))
    layers = [
        {"mediaType": LAYER_TYPES[str(d["mediaType"])], "digest": d["digest"], "size": d["size"]}
        for d in base.layers
    ]
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [*layers, layer.descriptor()],
        "annotations": dict(annotations),
    }
    return Image(Blob(MEDIA_MANIFEST, canonical_json(manifest)), config_blob, (layer,))


def import_base(base: BaseImage, dest: Path) -> list[str]:
    """Copy what the digest needs (index entry, manifest list, manifest, config; no layers) to
    ``dest``: a small layout that can be committed, so any checkout computes the runnable digest."""
    wanted = [base.pinned, base.manifest_digest, str(base.manifest["config"]["digest"])]
    index = json.loads((base.layout / "index.json").read_text())
    entries = [d for d in index.get("manifests", []) if d.get("digest") == base.pinned][:1]
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest in dict.fromkeys(wanted):
        (blobs / digest.removeprefix("sha256:")).write_bytes(_blob(base.layout, digest))
    (dest / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_bytes(canonical_json({**index, "manifests": entries}))
    return list(dict.fromkeys(wanted))


def link_base_layers(base: BaseImage, out: Path) -> int:
    """Hard-link (or copy) the base's layer blobs into ``out``; how many were there to link."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    linked = 0
    for descriptor in base.layers:
        source = base.blob_path(str(descriptor["digest"]))
        if not source.is_file():
            continue
        target = blobs / source.name
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:  # another file system
                shutil.copyfile(source, target)
        linked += 1
    return linked
