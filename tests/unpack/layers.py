"""Build layer tar archives in memory and apply them (helpers for the unpack tests)."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from ember.oci.digest import Digest
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
