"""An archive from a stream, as ``ember image load`` reads standard input (or a pipe, or
a compressed file): copied to an unnamed file beside the content store, decompressed on
the way when its first bytes say it is gzip, bzip2, xz or zstd (``docker load`` takes
``docker save | gzip``).  The docker-archive reader then reads it in place, by offsets.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from ember.images.dockerarchive import compression_of
from ember.images.errors import InvalidSource

_CHUNK = 1 << 20


def spool(stream: IO[bytes], directory: Path, label: str) -> BinaryIO:
    """``stream``'s archive, decompressed, in an unnamed file in ``directory`` (gone when
    closed, or with the process however it ends), positioned at its start.  ``label``
    names the stream in messages."""
    # the first bytes, left in the stream (a pipe cannot seek back)
    head = stream.peek(8)[:8] if isinstance(stream, io.BufferedReader) else b""
    kind = compression_of(head) if head else None
    out = cast(BinaryIO, tempfile.TemporaryFile(dir=directory))  # noqa: SIM115 (returned)
    try:
        reader: Any = stream
        bad: tuple[type[BaseException], ...] = ()  # what the decompressor raises on bad data
        if kind == "gzip":
            reader, bad = gzip.GzipFile(fileobj=stream, mode="rb"), (OSError, EOFError)
        elif kind == "bzip2":
            reader, bad = bz2.BZ2File(stream, "rb"), (OSError, EOFError)
        elif kind == "xz":
            reader, bad = lzma.LZMAFile(stream, "rb"), (lzma.LZMAError, EOFError)  # noqa: SIM115
        elif kind == "zstd":
            import zstandard  # only for this

            reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
            bad = (zstandard.ZstdError,)
        try:
            shutil.copyfileobj(reader, out, _CHUNK)
        except bad as e:
            if isinstance(e, OSError) and e.errno is not None:  # the disk's, not the data's
                raise
            raise InvalidSource(f"{label} is not valid {kind} data: {e}") from None
        out.flush()
        out.seek(0)
        return out
    except BaseException:
        out.close()
        raise
