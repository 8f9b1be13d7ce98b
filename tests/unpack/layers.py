"""Build layer tar archives in memory and apply them (helpers for the unpack tests)."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from ember.oci.digest import Digest
from ember.snapshots import system
from ember.unpack import ApplyStats, LayerSession, apply_layers

MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
MTIME = 1_600_000_000


@dataclass
class E:
    """One tar entry: a TarInfo plus its data."""

    info: tarfile.TarInfo
    data: bytes = b""
    pax: dict[str, str] = field(default_factory=dict)


def _info(name: str, type_: bytes, mode: int, uid: int, gid: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid = uid
    ti.gid = gid
    ti.mtime = mtime
    return ti


def reg(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
        mtime: int = MTIME, xattrs: dict[str, bytes] | None = None) -> E:
    ti = _info(name, tarfile.REGTYPE, mode, uid, gid, mtime)
    ti.size = len(data)
    return E(ti, data, _xattr_pax(xattrs))


def dir_(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = MTIME,
         xattrs: dict[str, bytes] | None = None) -> E:
    return E(_info(name, tarfile.DIRTYPE, mode, uid, gid, mtime), b"", _xattr_pax(xattrs))


def sym(name: str, target: str, uid: int = 0, gid: int = 0, mtime: int = MTIME) -> E:
    ti = _info(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime)
    ti.linkname = target
    return E(ti)


def hard(name: str, target: str, mode: int = 0o644) -> E:
    ti = _info(name, tarfile.LNKTYPE, mode, 0, 0, MTIME)
    ti.linkname = target
    return E(ti)


def dev(name: str, kind: bytes, major: int = 0, minor: int = 0, mode: int = 0o600) -> E:
    ti = _info(name, kind, mode, 0, 0, MTIME)
    ti.devmajor = major
    ti.devminor = minor
    return E(ti)


def whiteout(path: str) -> E:
    """``whiteout("a/b")`` is the entry ``a/.wh.b``."""
    parent, _, base = path.rpartition("/")
    return reg(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(directory: str) -> E:
    return reg(f"{directory.rstrip('/')}/.wh..wh..opq")


def _xattr_pax(xattrs: dict[str, bytes] | None) -> dict[str, str]:
    return {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in (xattrs or {}).items()}


def tar_bytes(entries: Iterable[E], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for e in entries:
            if e.pax:
                e.info.pax_headers = dict(e.pax)
            tf.addfile(e.info, io.BytesIO(e.data) if e.info.isreg() else None)
    return buf.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, compresslevel=1)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


class Layers:
    """Writes layer blobs under ``blobs`` and applies them onto a root."""

    def __init__(self, blobs: Path) -> None:
        self.blobs = blobs
        blobs.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def blob(self, raw: bytes, compression: str = "none") -> tuple[Path, str, Digest]:
        self._n += 1
        path = self.blobs / f"layer{self._n}"
        path.write_bytes(compress(raw, compression))
        return path, MEDIA[compression], Digest.of(raw)

    def apply(self, root: Path, *layers: Sequence[E] | bytes, compression: str = "none",
              session: LayerSession | None = None) -> ApplyStats:
        """Apply in one ``apply_layers`` call, or layer by layer through ``session``."""
        specs = []
        for layer in layers:
            raw = layer if isinstance(layer, bytes) else tar_bytes(layer)
            specs.append(self.blob(raw, compression))
        if session is None:
            return apply_layers(root, specs)
        total = ApplyStats()
        for spec in specs:
            total = total + session.apply(root, *spec)
        return total


class ImageLayers(Layers):
    """``Layers`` whose roots are ext4 images, each loop-mounted at its root between
    applies (the tests look at it and may change it there): an apply unmounts it,
    writes the layers into the image through libext2fs (``ext4tree``, as snapshots are
    built), checks it (``e2fsck -fn``) and mounts it again.  A failed apply leaves the
    image as it was before (a build's disk is discarded after a failure)."""

    def __init__(self, blobs: Path) -> None:
        super().__init__(blobs)
        self.images: dict[Path, Path] = {}
        self.mounted: dict[Path, system.LoopDevice] = {}

    def image(self, root: Path) -> Path:
        """The image behind ``root``, made (empty, like a snapshot pool's base) on first use."""
        if root not in self.images:
            # beside the blobs: a root may be made inside another root's mounted image
            image = self.blobs.parent / "images" / f"{len(self.images)}.ext4"
            image.parent.mkdir(exist_ok=True)
            system.mkfs_ext4(image, 1 << 30)  # 4 KiB blocks, as the default base disk
            self.images[root] = image
        return self.images[root]

    def mount(self, root: Path) -> None:
        self.mounted[root] = system.mount_image(self.image(root), root, readonly=False)

    def unmount(self, root: Path) -> None:
        device = self.mounted.pop(root, None)
        if device is not None:
            # the mount point removed first, as ember's own unmounts do: a copy of the
            # mount in a namespace made meanwhile would keep the disk in use
            system.unmount(root, device=device, remove_mountpoint=True)
            root.mkdir()

    def close(self) -> None:
        for root in sorted(self.mounted, key=lambda r: len(r.parts), reverse=True):
            self.unmount(root)  # roots made inside another root's image first

    def apply(self, root: Path, *layers: Sequence[E] | bytes, compression: str = "none",
              session: LayerSession | None = None) -> ApplyStats:
        specs = []
        for layer in layers:
            raw = layer if isinstance(layer, bytes) else tar_bytes(layer)
            specs.append(self.blob(raw, compression))
        image = self.image(root)
        self.unmount(root)
        before = image.with_name(image.name + ".before")
        subprocess.run(["cp", "--sparse=always", str(image), str(before)], check=True)
        try:
            total = ApplyStats()
            with contextlib.ExitStack() as stack:
                own = session or stack.enter_context(LayerSession())
                for spec in specs:
                    total = total + own.apply(image, *spec, image=True)
        except BaseException:
            os.replace(before, image)
            raise
        finally:
            if before.exists():
                before.unlink()
            subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
            self.mount(root)
        return total
