"""Layer media types -> decompression (parent side of the applier).

The mapping is ember.oci's, by media type, never by sniffing: a blob whose first bytes
contradict its media type is refused with a message saying so, rather than
being fed to the wrong decompressor.
"""

from __future__ import annotations

import io
import os
from contextlib import ExitStack
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ExpansionLimit:
    """How far one layer's compressed bytes may expand: to ``ratio`` times their size,
    and never less than ``floor`` bytes."""

    ratio: int
    floor: int

    def allowed(self, compressed: int) -> int:
        return max(compressed * self.ratio, self.floor)


#: The budget of uncompressed bytes of every compressed layer (looked up when a layer is
#: opened).  Without one a decompression bomb cost no disk (zero blocks become holes,
#: bytes after the end of the archive are only hashed) but unbounded work: zstd packs
#: zeros ~32000:1, gzip ~1000:1, so a 100 MB blob made ember inflate and hash ~3 TB.
#: Real layers compress 2-10x (a Debian rootfs ~3x, text-heavy ones up to ~15x with
#: zstd -19): 128x leaves an order of magnitude to spare above them and stays an order
#: below what runs of zeros give.  The floor keeps small layers that hold one big
#: compressible file (a zero-filled image, a sparse database) working, and 512 MiB costs
#: about half a second of inflating and hashing per layer.
EXPANSION_LIMIT = ExpansionLimit(ratio=128, floor=512 << 20)


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


class ZstdFrames:
    """Follows the frame and block headers of a zstd stream as it is read, to tell at its
    end whether it ended on a frame boundary.

    zstandard's stream reader returns a clean EOF when its input stops in the middle of
    a frame, so a truncated blob read as a layer that merely ended early (gzip says
    "ended before the end-of-stream marker").  Only headers are looked at (RFC 8878): a
    frame header, each block's 3-byte header (its size says how far the next one is), the
    checksum, skippable frames.  That is a few Python operations per block (blocks hold
    up to 128 KiB): ~2 ms for a 115 MiB Debian layer (~1.5% of inflating it); a hostile
    blob of 4-byte blocks costs ~50 ms per MiB, less than the expansion budget allows.
    Anything it does not know (a legacy frame) stops the following: the decompressor
    judges those bytes itself, and the end is then not checked.
    """

    __slots__ = ("_head", "_skip", "_in_frame", "_checksum", "lost")

    def __init__(self) -> None:
        self._head = b""  # the header read so far (it may straddle reads)
        self._skip = 0  # bytes of block data, checksum or skippable frame still to pass
        self._in_frame = False  # block headers expected, not a frame header
        self._checksum = False  # the current frame ends with a 4-byte checksum
        self.lost = False

    @property
    def complete(self) -> bool:
        """Whether the bytes so far end on a frame boundary."""
        return self.lost or (not self._in_frame and not self._skip and not self._head)

    def feed(self, data: bytes | memoryview) -> None:
        pos, end = self._skip, len(data)
        while pos < end and not self.lost:
            if self._in_frame and not self._head and pos + 3 <= end:
                pos = self._blocks(data, pos, end)
            else:
                pos = self._header(data, pos, end)
        self._skip = max(pos - end, 0)

    def _blocks(self, data: bytes | memoryview, pos: int, end: int) -> int:
        """Pass the blocks whose headers lie whole in ``data`` from ``pos``; where the
        next header starts (past ``end``: the last block's data goes on)."""
        while pos + 3 <= end:
            value = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            kind = value >> 1 & 3
            pos += 4 if kind == 1 else 3 + (value >> 3)  # an RLE block stores one byte
            if kind == 3:
                self.lost = True  # a reserved block type: the decompressor refuses it
                break
            if value & 1:  # the last block of its frame
                self._in_frame = False
                return pos + 4 * self._checksum
        return pos

    def _header(self, data: bytes | memoryview, pos: int, end: int) -> int:
        """Read (part of) a frame header, or a block header split between reads."""
        need = self._header_size()
        take = min(need - len(self._head), end - pos)
        self._head += bytes(data[pos:pos + take])
        pos += take
        if len(self._head) == need == self._header_size():
            head, self._head = self._head, b""
            if self._in_frame:
                return self._blocks(head, 0, 3) - 3 + pos
            pos += self._parse_frame(head)
        return pos

    def _header_size(self) -> int:
        """Bytes of the header being read, as far as its first bytes tell."""
        head = self._head
        if self._in_frame:
            return 3
        if len(head) < 4:
            return 4
        if head[:4] != _ZSTD_MAGIC:
            return 8  # a skippable frame: magic, size (else _parse_frame gives up)
        if len(head) < 5:
            return 5
        descriptor = head[4]
        single_segment = descriptor >> 5 & 1
        content_size = (single_segment, 2, 4, 8)[descriptor >> 6]
        return 5 + (not single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size

    def _parse_frame(self, head: bytes) -> int:
        """Take a frame's header; the bytes to pass after it."""
        if head[:4] == _ZSTD_MAGIC:
            self._in_frame = True
            self._checksum = bool(head[4] & 4)
            return 0
        if head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
            return int.from_bytes(head[4:8], "little")
        self.lost = True
        return 0


class _Counted(io.RawIOBase):
    """A blob's compressed bytes on their way to the decompressor: counted (the layer's
    expansion budget grows with them) and, for zstd, followed frame by frame."""

    def __init__(self, raw: io.RawIOBase, frames: ZstdFrames | None) -> None:
        super().__init__()
        self._raw = raw
        self.frames = frames
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        # the decompressors call read(); one copy of the data, as the file's own read
        data = self._raw.read(size) or b""
        self.count += len(data)
        if self.frames is not None:
            self.frames.feed(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer) or 0
        self.count += n
        if self.frames is not None:
            self.frames.feed(memoryview(buffer)[:n])
        return n


class UncompressedReader:
    """The uncompressed bytes of a layer blob; a context manager closing everything it opened.

    gzip uses ISA-L, with one helper thread for big blobs so that inflating
    overlaps the caller's hashing and piping (which matters on a 2-core host).

    A compressed blob may expand to ``EXPANSION_LIMIT`` of its size (that of a stored
    blob; of the bytes received so far for one still arriving), counted per chunk:
    beyond, reading raises InvalidLayer (a decompression bomb).  A zstd blob must end
    on a frame boundary.
    """

    def __init__(
        self, blob: Path, compression: Compression, stream: io.RawIOBase | None = None,
        *, name: str | None = None,
    ) -> None:
        """``stream``: the blob's bytes, read instead of opening ``blob`` (which then only
        names it in messages), and closed with this; they may still be arriving (a
        download), which already runs beside the inflating: no helper thread then.
        ``name``: what messages call the layer (default: after ``blob``)."""
        self._name = name or f"layer {blob.name}"
        self._limit = EXPANSION_LIMIT
        self._size = 0  # the compressed size, when known before reading
        self._out = 0  # uncompressed bytes read so far
        self._frames = ZstdFrames() if compression == "zstd" else None
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
                self._size = os.fstat(raw.fileno()).st_size
                threaded = self._size >= THREADED_GZIP_MIN
            self._counted = _Counted(raw, self._frames)
            # a plain tar is its own size: nothing to bound
            self._allowed = self._limit.allowed(self._size) if compression != "none" else 1 << 63
            reader: Any
            if compression == "none":
                reader = raw
            elif compression == "gzip" and threaded:
                # imported by the layers that need it (its threads and queues, like
                # zstandard below, cost a process start ~1 ms when no such layer comes);
                # `from`, because `import isal.x` here would make `isal` a local name
                from isal import igzip_threaded

                reader = stack.enter_context(
                    igzip_threaded.open(self._counted, "rb", threads=1, block_size=CHUNK)
                )
            elif compression == "gzip":
                # small blobs: starting and feeding a helper thread costs more than it saves
                reader = stack.enter_context(isal.igzip.open(self._counted, "rb"))
            else:
                import zstandard

                dctx = zstandard.ZstdDecompressor()
                reader = stack.enter_context(
                    # a raw stream is what it reads (its stubs ask for a typing.IO)
                    dctx.stream_reader(
                        cast(BinaryIO, self._counted), read_size=CHUNK, read_across_frames=True,
                        closefd=False,
                    )
                )
            self._reader = reader
            self._stack = stack.pop_all()

    def readinto(self, buf: memoryview) -> int:
        try:
            n: int = self._reader.readinto(buf)
            if not n and self._frames is not None and not self._frames.complete:
                # as gzip's "ended before the end-of-stream marker"
                raise EOFError("zstd data ends in the middle of a frame (a truncated blob?)")
        except EmberError:
            raise
        except Exception:
            if self._stream is not None:
                _read_to_end(self._stream)
            raise
        self._out += n
        if self._out > self._allowed:
            self._check_expansion()
        return n

    def _check_expansion(self) -> None:
        """Past the budget of what was known: recount with the compressed bytes read
        since (a blob still arriving), and refuse the layer if it is still over."""
        compressed = max(self._size, self._counted.count)
        self._allowed = self._limit.allowed(compressed)
        if self._out <= self._allowed:
            return
        if self._stream is not None:
            _read_to_end(self._stream)  # a failing download says what went wrong instead
        limit = self._limit
        raise InvalidLayer(
            f"{self._name} expands to more than {self._allowed} bytes (compressed {compressed}): "
            f"refused as a decompression bomb (a layer may expand to {limit.ratio} times its "
            f"compressed size, and to {limit.floor} bytes whatever its size)"
        )

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
