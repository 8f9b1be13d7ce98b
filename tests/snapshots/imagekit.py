"""Synthetic test images, written straight into a home's content store.

Tests of the snapshotter need images with chosen layers (shared bases, a big
layer to kill a build in the middle of); these are real OCI manifests,
configs and gzip tar layers, only assembled here instead of pulled.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field

from ember.home import Home
from ember.images.model import Image, Layer
from ember.oci import mediatypes as mt
from ember.oci.chainid import chain_ids
from ember.oci.config import parse_config
from ember.oci.digest import Digest
from ember.oci.manifest import ImageManifest, parse_manifest
from ember.oci.platform import Platform
from ember.store.content import ContentStore


@dataclass
class Entry:
    name: str
    data: bytes | None = None  # a regular file; None: a directory
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str | None = None  # a symlink target
    random_size: int = 0  # a file of this many pseudo-random bytes (incompressible)
    seed: int = 0


@dataclass
class LayerSpec:
    entries: list[Entry] = field(default_factory=list)


def _random_bytes(n: int, seed: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(f"seed{seed}".encode()).digest()
    counter = 0
    while len(out) < n:
        out += hashlib.sha512(block + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:n])


def layer_tar(spec: LayerSpec) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in spec.entries:
            info = tarfile.TarInfo(e.name)
            info.uid, info.gid, info.mtime = e.uid, e.gid, 1704067200
            if e.link is not None:
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, e.link, 0o777
                tar.addfile(info)
            elif e.data is None and not e.random_size:
                info.type, info.mode = tarfile.DIRTYPE, e.mode or 0o755
                tar.addfile(info)
            else:
                data = e.data if e.data is not None else _random_bytes(e.random_size, e.seed)
                info.size, info.mode = len(data), e.mode
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_image(home: Home, layers: list[LayerSpec], reference: str = "test/image:latest") -> Image:
    """Store the layers, a config and a manifest in ``home``'s content store; return the Image."""
    store = ContentStore(home.content)
    diff_ids, descs, layer_objs = [], [], []
    for spec in layers:
        raw = layer_tar(spec)
        diff_id = Digest.of(raw)
        blob = gzip.compress(raw, compresslevel=1, mtime=0)
        digest = store.put_bytes(blob)
        diff_ids.append(diff_id)
        descs.append({"mediaType": mt.OCI_LAYER_GZIP, "digest": str(digest), "size": len(blob)})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [str(d) for d in diff_ids]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = store.put_bytes(config_bytes)
    manifest_bytes = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {
                "mediaType": mt.OCI_CONFIG,
                "digest": str(config_digest),
                "size": len(config_bytes),
            },
            "layers": descs,
        },
        sort_keys=True,
    ).encode()
    manifest_digest = store.put_bytes(manifest_bytes)
    manifest = parse_manifest(manifest_bytes, mt.OCI_MANIFEST)
    assert isinstance(manifest, ImageManifest)
    chains = chain_ids(diff_ids)
    for desc, diff_id, chain in zip(manifest.layers, diff_ids, chains, strict=True):
        layer_objs.append(Layer(desc.media_type, desc.digest, desc.size, diff_id, chain))
    return Image(
        reference=reference,
        manifest_digest=manifest_digest,
        manifest=manifest,
        config_digest=config_digest,
        config=parse_config(config_bytes),
        platform=Platform.of("linux", "amd64"),
        layers=layer_objs,
    )


def base_layers() -> list[LayerSpec]:
    return [
        LayerSpec([Entry("bin"), Entry("bin/tool", b"#!/bin/sh\necho tool\n", 0o755), Entry("etc"),
                   Entry("etc/hostname", b"base\n")]),
        LayerSpec([Entry("etc/motd", b"hello\n"), Entry("usr"), Entry("usr/lib"),
                   Entry("usr/lib/libx.so", b"\x7fELF" + b"x" * 5000), Entry("lib", link="usr/lib")]),
    ]  # fmt: skip
