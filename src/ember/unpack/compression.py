"""Layer media types -> decompression (parent side of the applier).

The mapping is ember.oci's, by media type, never by sniffing: a blob whose first bytes
contradict its media type is refused with a message saying so, rather than
being fed to the wrong decompressor.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import isal.igzip

from ember.oci.errors import UnsupportedMediaType
from ember.oci.mediatypes import Compression, layer_compression
from ember.unpack.errors import InvalidLayer, UnsupportedLayer

#: read size for compressed input and the uncompressed chunks handed to the applier
CHUNK = 1 << 20
#: compressed size from which inflating in a helper thread pays off
THREADED_GZIP_MIN = 4 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def compression_of(media_type: str) -> Compression:
    """The compression of a layer media type (ember.oci's table); UnsupportedLayer otherwise."""
    try:
        return layer_compression(media_type)
    except UnsupportedMediaType as e:
        raise UnsupportedLayer(e.message) from None


def check_blob(blob: Path, compression: Compression) -> None:
    """Refuse a blob whose first bytes contradict its media type (OSError if unreadable)."""
    with open(blob, "rb") as f:
        head = f.read(4)
    if compression == "gzip" and not head.startswith(_GZIP_MAGIC):
        raise InvalidLayer(f"layer blob {blob.name} is not gzip data although its media type says so")
    zstd_skippable = len(head) == 4 and head[0] & 0xF0 == 0x50 and head[1:] == b"\x2a\x4d\x18"
    if compression == "zstd" and not (head.startswith(_ZSTD_MAGIC) or zstd_skippable):
        raise InvalidLayer(f"layer blob {blob.name} is not zstd data although its media type says so")


class UncompressedReader:
    """The uncompressed bytes of a layer blob; a context manager closing everything it opened.

    gzip uses ISA-L, with one helper thread for big blobs so that inflating
    overlaps the caller's hashing and piping (which matters on a 2-core host).
    """

    def __init__(self, blob: Path, compression: Compression) -> None:
        self._stack = ExitStack()
        with self._stack as stack:
            raw = stack.enter_context(open(blob, "rb", buffering=0))  # noqa: SIM115
            reader: Any
            if compression == "none":
                reader = raw
            elif compression == "gzip" and os.fstat(raw.fileno()).st_size >= THREADED_GZIP_MIN:
                # imported by the layers that need it (its threads and queues, like
                # zstandard below, cost a process start ~1 ms when no such layer comes);
                # `from`, because `import isal.x` here would make `isal` a local name
                from isal import igzip_threaded

                reader = stack.enter_context(
                    igzip_threaded.open(raw, "rb", threads=1, block_size=CHUNK)
                )
            elif compression == "gzip":
                # small blobs: starting and feeding a helper thread costs more than it saves
                reader = stack.enter_context(isal.igzip.open(raw, "rb"))
            else:
                import zstandard

                dctx = zstandard.ZstdDecompressor()
                reader = stack.enter_context(
                    dctx.stream_reader(raw, read_size=CHUNK, read_across_frames=True, closefd=False)
                )
            self._reader = reader
            self._stack = stack.pop_all()

    def readinto(self, buf: memoryview) -> int:
        n: int = self._reader.readinto(buf)
        return n

    def __enter__(self) -> UncompressedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
