"""The public entry points: apply layer blobs onto a root directory."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Protocol

from ember.oci.digest import Digest
from ember.unpack.compression import Compression, UncompressedReader, check_blob, compression_of
from ember.unpack.errors import DiffIDMismatch, UnpackError
from ember.unpack.sandbox import MAX_LAYERS_PER_CHILD, ApplierSession, LayerStream, apply_streams


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
    return apply_layers(root, [(blob, media_type, diff_id)])


def apply_layers(
    root: Path,
    layers: Sequence[tuple[Path, str, Digest | None]],
    *,
    opener: Callable[[int], io.RawIOBase | None] | None = None,
) -> ApplyStats:
    """Apply ``(blob, media_type, diff_id)`` layers in order (lowest first) onto ``root``.

    One chroot-ed child applies up to MAX_LAYERS_PER_CHILD layers; each layer's
    DiffID is checked before the next one reaches the child (which is streamed
    while the child still applies the one before).  With ``opener``, blobs may
    still be arriving (a pull in progress): ``opener(i)`` opens layer ``i``'s
    blob when its turn comes (``Pulling.open_layer``), or returns None once the
    file named for it is there, and what it or reading raises ends the apply.
    Such a blob may be read before it is verified: its layer needs a
    ``diff_id``, the check of what was read.
    """
    root = Path(root)
    if not root.is_dir():
        raise UnpackError(f"cannot apply a layer onto {root}: not a directory")
    if opener is not None and any(diff_id is None for _, _, diff_id in layers):
        raise UnpackError("layers read as they arrive need their DiffIDs to be checked against")
    prepared = [
        _prepare(Path(blob), media_type, diff_id, None if opener is None else partial(opener, i))
        for i, (blob, media_type, diff_id) in enumerate(layers)
    ]
    total = ApplyStats()
    known = {f.name for f in fields(ApplyStats)}

    for first in range(0, len(prepared), MAX_LAYERS_PER_CHILD):
        batch = prepared[first:first + MAX_LAYERS_PER_CHILD]
        results: list[ApplyStats] = []

        def check(i: int, batch: list[_Prepared] = batch) -> None:
            _check(batch[i])

        def done(i: int, counts: dict[str, int], streamed: int, batch: list[_Prepared] = batch,
                 results: list[ApplyStats] = results) -> None:
            results.append(ApplyStats(
                layers=1, tar_bytes=streamed, diff_ids=(_digest(batch[i]),),
                **{k: v for k, v in counts.items() if k in known},
            ))

        apply_streams(os.fspath(root), [p.stream for p in batch], check, done)
        for stats in results:
            total = total + stats
    return total


class LayerSession:
    """Applies single layers onto different roots in turn through one applier child
    (a snapshot chain: one mounted disk per layer).  Same guarantees as
    ``apply_layer``; saves a process per layer.  When ``apply`` returns or
    raises, nothing of ours is left inside ``root``: it can be unmounted."""

    def __init__(self) -> None:
        self._session = ApplierSession()

    def __enter__(self) -> LayerSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def apply(
        self, root: Path, blob: Path, media_type: str, diff_id: Digest | None = None,
        *, opener: Callable[[], io.RawIOBase | None] | None = None,
    ) -> ApplyStats:
        """``opener``: as ``apply_layers``' for this one layer (its blob read as it arrives,
        or None once ``blob`` is stored); it then needs ``diff_id``."""
        root = Path(root)
        if not root.is_dir():
            raise UnpackError(f"cannot apply a layer onto {root}: not a directory")
        if opener is not None and diff_id is None:
            raise UnpackError("a layer read as it arrives needs its DiffID to be checked against")
        layer = _prepare(Path(blob), media_type, diff_id, opener)
        counts, streamed = self._session.apply(os.fspath(root), layer.stream, lambda: _check(layer))
        known = {f.name for f in fields(ApplyStats)}
        return ApplyStats(
            layers=1, tar_bytes=streamed, diff_ids=(_digest(layer),),
            **{k: v for k, v in counts.items() if k in known},
        )


def _check_blob(blob: Path, compression: Compression) -> None:
    try:
        check_blob(blob, compression)
    except OSError as e:
        raise UnpackError(f"cannot read layer blob {blob}: {e.strerror}") from None


def _digest(layer: _Prepared) -> Digest:
    return Digest(layer.algorithm, layer.hasher.hexdigest())


def _check(layer: _Prepared) -> None:
    got = _digest(layer)
    if layer.diff_id is not None and got != layer.diff_id:
        raise DiffIDMismatch(
            f"{layer.stream.describe} does not match its DiffID: the image config says "
            f"{layer.diff_id}, the uncompressed layer is {got}"
        )


def _layer_name(blob: Path) -> str:
    """How the bomb check's message names a layer: by its digest where its blob is in a
    content store (``.../sha256/HEX``), else by its file name."""
    if blob.parent.name in ("sha256", "sha512"):
        return f"layer {blob.parent.name}:{blob.name[:128]}"
    return f"layer {blob.name[:80]}"


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class _Prepared:
    stream: LayerStream
    hasher: _Hash
    algorithm: str
    diff_id: Digest | None


def _prepare(
    blob: Path, media_type: str, diff_id: Digest | None,
    opener: Callable[[], io.RawIOBase | None] | None = None,
) -> _Prepared:
    """Check a layer before anything is applied: media type known, blob readable and
    plausible (a blob that ``opener`` opens as it arrives: its first bytes, when its
    turn comes)."""
    compression = compression_of(media_type)
    if opener is None:
        _check_blob(blob, compression)

    name = _layer_name(blob)

    def open_blob() -> UncompressedReader:
        stream = opener() if opener is not None else None
        if stream is not None:
            return UncompressedReader(blob, compression, stream, name=name)
        if opener is not None:
            _check_blob(blob, compression)
        return UncompressedReader(blob, compression, name=name)

    algorithm = diff_id.algorithm if diff_id is not None else "sha256"
    hasher: _Hash = hashlib.new(algorithm)
    stream = LayerStream(
        open=open_blob,
        hasher=hasher,
        describe=f"layer {blob.name[:80]}",
    )
    return _Prepared(stream, hasher, algorithm, diff_id)
