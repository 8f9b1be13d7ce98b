"""Layer media types -> decompression (parent side of the applier).

The mapping is ember.oci's, by media type, never by sniffing: a blob whose first bytes
contradict its media type is refused with a message saying so, rather than
being fed to the wrong decompressor.
"""

from __future__ import annotations

import io
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO, cast

import isal.igzip

from ember.errors import EmberError
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


_HEAD = 4


def check_blob(blob: Path, compression: Compression) -> None:
    """Refuse a blob whose first bytes contradict its media type (OSError if unreadable)."""
    with open(blob, "rb") as f:
        _check_head(f.read(_HEAD), compression, blob.name)


def _check_head(head: bytes, compression: Compression, name: str) -> None:
    if compression == "gzip" and not head.startswith(_GZIP_MAGIC):
        raise InvalidLayer(f"layer blob {name} is not gzip data although its media type says so")
    zstd_skippable = len(head) == 4 and head[0] & 0xF0 == 0x50 and head[1:] == b"\x2a\x4d\x18"
    if compression == "zstd" and not (head.startswith(_ZSTD_MAGIC) or zstd_skippable):
        raise InvalidLayer(f"layer blob {name} is not zstd data although its media type says so")


def _read_to_end(stream: io.RawIOBase) -> None:
    """Before raising an error about a blob read as it arrives: bytes that are not what
    they should be may be a download going wrong (a corrupt body, which its digest
    catches at the end), and the download's error, raised at the end of the stream,
    says what happened."""
    while stream.read(CHUNK):
        pass


class _HeadChecked(io.RawIOBase):
    """A blob read as it arrives, refused (``_check_head``) as soon as its first bytes are
    in, before the decompressor sees any: ``check_blob`` for a stream."""

    def __init__(self, raw: io.RawIOBase, compression: Compression, name: str) -> None:
        super().__init__()
        self._raw = raw
        head = b""
        while len(head) < _HEAD:
            more = raw.read(_HEAD - len(head))
            if not more:
                break
            head += more
        try:
            _check_head(head, compression, name)
        except InvalidLayer:
            _read_to_end(raw)
            raise
        self._head = head

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(self._head), len(buffer))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._raw.readinto(buffer) or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


class UncompressedReader:
    """The uncompressed bytes of a layer blob; a context manager closing everything it opened.

    gzip uses ISA-L, with one helper thread for big blobs so that inflating
    overlaps the caller's hashing and piping (which matters on a 2-core host).
    """

    def __init__(
        self, blob: Path, compression: Compression, stream: io.RawIOBase | None = None
    ) -> None:
        """``stream``: the blob's bytes, read instead of opening ``blob`` (which then only
        names it in messages), and closed with this; they may still be arriving (a
        download), which already runs beside the inflating: no helper thread then."""
        self._stack = ExitStack()
        with self._stack as stack:
            raw: io.RawIOBase
            threaded = False
            self._stream: io.RawIOBase | None = None
            if stream is not None:
                stack.callback(stream.close)
                raw = self._stream = stack.enter_context(
                    _HeadChecked(stream, compression, blob.name)
                )
            else:
                raw = stack.enter_context(open(blob, "rb", buffering=0))  # noqa: SIM115
                threaded = os.fstat(raw.fileno()).st_size >= THREADED_GZIP_MIN
            reader: Any
            if compression == "none":
                reader = raw
            elif compression == "gzip" and threaded:
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
                    # a raw stream is what it reads (its stubs ask for a typing.IO)
                    dctx.stream_reader(
                        cast(BinaryIO, raw), read_size=CHUNK, read_across_frames=True,
                        closefd=False,
                    )
                )
            self._reader = reader
            self._stack = stack.pop_all()

    def readinto(self, buf: memoryview) -> int:
        try:
            n: int = self._reader.readinto(buf)
        except EmberError:
            raise
        except Exception:
            if self._stream is not None:
                _read_to_end(self._stream)
            raise
        return n

    def settle(self) -> None:
        """For a blob read as it arrives, once its reader stopped early: read it to its
        end, which raises the download's error if it failed (a corrupt body is caught
        by its digest only there); nothing for a stored blob."""
        if self._stream is not None:
            _read_to_end(self._stream)

    def __enter__(self) -> UncompressedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
