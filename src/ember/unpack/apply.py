"""The public entry points: apply layer blobs onto a root directory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from ember.oci.digest import Digest
from ember.unpack.compression import UncompressedReader, check_blob, compression_of
from ember.unpack.errors import DiffIDMismatch, UnpackError
from ember.unpack.sandbox import apply_stream


@dataclass(frozen=True)
class ApplyStats:
    """What applying one or more layers did (counters add up across layers)."""

    layers: int = 0
    entries: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    whiteouts: int = 0
    #: uncompressed tar bytes streamed
    tar_bytes: int = 0
    #: file data bytes in the archives
    bytes_written: int = 0
    #: bytes of file data left as holes (aligned zero blocks, sparse members)
    hole_bytes: int = 0
    diff_ids: tuple[Digest, ...] = field(default=())

    def __add__(self, other: ApplyStats) -> ApplyStats:
        values = {}
        for f in fields(self):
            values[f.name] = getattr(self, f.name) + getattr(other, f.name)
        return ApplyStats(**values)


def apply_layer(root: Path, blob: Path, media_type: str, diff_id: Digest | None = None) -> ApplyStats:
    """Apply one layer blob (compressed as ``media_type`` says) onto the directory ``root``.

    Never writes outside ``root``.  When ``diff_id`` is given, the uncompressed
    stream must hash to it, else DiffIDMismatch.  On any error ``root`` is left
    partly applied: apply into a fresh snapshot and throw it away on failure.
    """
    root = Path(root)
    blob = Path(blob)
    if not root.is_dir():
        raise UnpackError(f"cannot apply a layer onto {root}: not a directory")
    compression = compression_of(media_type)
    try:
        check_blob(blob, compression)
    except OSError as e:
        raise UnpackError(f"cannot read layer blob {blob}: {e.strerror}") from None
    algorithm = diff_id.algorithm if diff_id is not None else "sha256"
    hasher = hashlib.new(algorithm)
    describe = f"layer {blob.name[:80]}"
    counts, total = apply_stream(os.fspath(root), lambda: UncompressedReader(blob, compression), hasher, describe)
    got = Digest(algorithm, hasher.hexdigest())
    if diff_id is not None and got != diff_id:
        raise DiffIDMismatch(
            f"{describe} does not match its DiffID: the image config says {diff_id}, "
            f"the uncompressed layer is {got}"
        )
    known = {f.name for f in fields(ApplyStats)}
    return ApplyStats(
        layers=1, tar_bytes=total, diff_ids=(got,),
        **{k: v for k, v in counts.items() if k in known},
    )


def apply_layers(root: Path, layers: Sequence[tuple[Path, str, Digest | None]]) -> ApplyStats:
    """Apply ``(blob, media_type, diff_id)`` layers in order (lowest first) onto ``root``."""
    total = ApplyStats()
    for blob, media_type, diff_id in layers:
        total = total + apply_layer(root, blob, media_type, diff_id)
    return total

