"""A forward-only tar reader over a pipe, built for the chroot-ed applier.

Header decoding (ustar, GNU long names, the three GNU sparse formats) is
tarfile's own ``TarInfo.fromtarfile``: that part is well tested and easy to
get wrong.  Everything around it is ember's: the buffering (one
``os.read`` per MiB, file data handed out as slices of that buffer so it is
copied once, pipe -> page cache), strict end-of-archive handling (tarfile
silently treats a corrupt header as the end of the archive), bounds on
header sizes, the validation of offsets and sparse maps, and the parsing of
pax records (``_TarInfo``).

The same header reading indexes ``docker save`` archives (``FileReader``: a
regular file, read by offset, whose file data is skipped by seeking), so that
no untrusted tar header ever reaches tarfile's own archive walk.
"""

from __future__ import annotations

import os
import struct
import tarfile
from collections.abc import Iterator
from typing import Any

from ember.unpack.errors import InvalidLayer

BLOCK = tarfile.BLOCKSIZE
READ_SIZE = 1 << 20
#: bytes of headers (pax records, GNU long names, sparse maps) one entry may carry: 1 MiB,
#: Go's archive/tar limit (Docker, containerd), which reads no larger one; 16 MiB of
#: sparse map became ~8M Python ints (~0.8 GB) in the applier
MAX_HEADER_BYTES = 1 << 20
#: bytes read past the end of an archive (``PipeReader.drain``): what tar writers pad it
#: with, to a record of 10240 bytes by default (tarfile, GNU tar; 64 KiB with GNU tar's
#: largest usual blocking factor, -b 128).  Whatever follows is hashed by the parent for
#: the DiffID, not piped here: reading it cost the applier as much as its data, unbounded.
TRAILER_ALLOWANCE = 64 << 10

# tarfile's header exceptions are not in its __all__ (nor in typeshed), but
# telling them apart is the point: zero block = end, short block = truncated.
_EOFHeader: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_EmptyHeader: type[Exception] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_TruncatedHeader: type[Exception] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]


class PipeReader:
    """Buffered, forward-only reader of a file descriptor that tracks its offset."""

    #: what the stream is, in messages
    subject = "layer"

    def __init__(self, fd: int, read_size: int = READ_SIZE) -> None:
        self._fd = fd
        self._read_size = read_size
        self._buf = b""
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self.header_budget = MAX_HEADER_BYTES

    def _read_more(self) -> bytes:
        """The bytes after the buffer (at stream offset ``_base + len(_buf)``); empty at EOF."""
        return os.read(self._fd, self._read_size)

    def _fill(self) -> bool:
        """Replace the (fully consumed) buffer with the next read; False at EOF."""
        data = self._read_more()
        if not data:
            return False
        self._base += len(self._buf)
        self._buf = data
        self._pos = 0
        return True

    def tell(self) -> int:
        return self._base + self._pos

    def read(self, n: int) -> bytes:
        """Header bytes (tarfile calls this); short only at end of stream."""
        if n < 0 or n > self.header_budget:
            raise InvalidLayer(f"tar header at offset {self.tell()} is too large ({n} bytes)")
        self.header_budget -= n
        end = self._pos + n
        if end <= len(self._buf):
            out = self._buf[self._pos:end]
            self._pos = end
            return out
        parts = [self._buf[self._pos:]]
        have = len(parts[0])
        self._pos = len(self._buf)
        while have < n and self._fill():
            take = min(n - have, len(self._buf))
            parts.append(self._buf[:take])
            self._pos = take
            have += take
        return b"".join(parts)

    def peek(self, n: int) -> bytes | None:
        """The next ``n`` bytes if the buffer holds them all, without consuming them."""
        end = self._pos + n
        if end <= len(self._buf):
            return self._buf[self._pos:end]
        return None

    def peek_filled(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end of the stream) without consuming them,
        reading more when the buffer ends before them."""
        while len(self._buf) - self._pos < n:
            data = self._read_more()
            if not data:
                break
            self._base += self._pos
            self._buf = self._buf[self._pos:] + data
            self._pos = 0
        return self._buf[self._pos:self._pos + n]

    def advance(self, n: int) -> None:
        """Consume ``n`` bytes that ``peek`` returned."""
        self._pos += n

    def chunks(self, n: int) -> Iterator[tuple[bytes, int, int]]:
        """Consume ``n`` bytes, yielding ``(buffer, start, end)`` slices without copying."""
        while n > 0:
            if self._pos >= len(self._buf) and not self._fill():
                raise InvalidLayer(f"layer ends in the middle of a file's data (offset {self.tell()})")
            take = min(n, len(self._buf) - self._pos)
            start = self._pos
            self._pos += take
            n -= take
            yield self._buf, start, start + take

    def skip_to(self, offset: int) -> None:
        n = offset - self.tell()
        if n < 0:
            raise InvalidLayer(f"tar entry overlaps the previous one at offset {self.tell()}")
        for _ in self.chunks(n):
            pass

    def drain(self, allowance: int = TRAILER_ALLOWANCE) -> None:
        """After the end of the archive: read on to EOF, but no further than ``allowance``
        bytes past here.  Those bytes are padding, which the writer, hashing the whole
        stream for the DiffID, should not be cut off by; when more follow, the writer
        hashes them without sending them (``sandbox._hash_rest``)."""
        stop = self.tell() + allowance
        self._pos = len(self._buf)
        while self._base + len(self._buf) < stop and self._fill():
            self._pos = len(self._buf)


class FileReader(PipeReader):
    """A PipeReader over a regular file that reads by offset and skips file data by seeking.

    ``pread`` leaves the file position alone (others may read the same file), and
    skipping does not read the data of the members it passes: indexing an archive of
    gigabytes reads its headers only.
    """

    subject = "archive"

    def __init__(self, fd: int, read_size: int = READ_SIZE) -> None:
        super().__init__(fd, read_size)
        self._size = os.fstat(fd).st_size

    def _read_more(self) -> bytes:
        return os.pread(self._fd, self._read_size, self._base + len(self._buf))

    def skip_to(self, offset: int) -> None:
        n = offset - self.tell()
        if n < 0:
            raise InvalidLayer(f"tar entry overlaps the previous one at offset {self.tell()}")
        if self._pos + n <= len(self._buf):
            self._pos += n
            return
        if offset > self._size:  # what reading the data would have found
            raise InvalidLayer(f"archive ends in the middle of a file's data (offset {self._size})")
        self._base, self._buf, self._pos = offset, b"", 0


# name mode uid gid size mtime chksum type linkname magic version uname gname devmajor devminor prefix
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_PLAIN_TYPES = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE,
                          tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE))
_DATA_TYPES = frozenset(tarfile.REGULAR_TYPES)


_OCTAL_DIGITS = b"01234567"


def _octal(field: bytes) -> int | None:
    """A numeric header field's value where tarfile and Go's archive/tar (Docker,
    containerd, umoci) read the same number from it; None where they do not, or where
    either refuses it.

    They differ on fields no writer makes: tarfile stops at the first NUL, so a field
    that starts with one is 0 to it, where Go skips leading NULs and reads the
    digits after them (a size read differently frames every entry after it
    differently: ember saw a file that Docker did not, a uid of 0 that was 1000);
    tarfile's int() also takes signs, underscores and inner spaces, which Go refuses.
    """
    text = field.rstrip(b" \x00")
    if text.isdigit():  # ASCII digits only (all but a few fields): padding after them
        try:
            return int(text, 8)
        except ValueError:  # an 8 or a 9
            return None
    if field[0] & 0x80:  # base-256, as both read it (tarfile refuses leads Go takes)
        try:
            value: int = tarfile.nti(field)  # type: ignore[attr-defined]
        except tarfile.HeaderError:
            return None
        return value
    if b"\x00" in text:  # a NUL before digits: 0 to tarfile, not to Go
        return None
    text = text.lstrip(b" ")
    if text.translate(None, _OCTAL_DIGITS):
        return None
    return int(text, 8) if text else 0


#: where the numeric fields of a header block lie: mode, uid, gid, size, mtime,
#: checksum, device major and minor
_NUMERIC_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156),
                   (329, 337), (337, 345))
#: an old GNU sparse header's: four (offset, length) pairs of its map, its real size
_OLD_GNU_SPARSE_FIELDS = (*((386 + 12 * i, 398 + 12 * i) for i in range(8)), (483, 495))


def _check_numeric_fields(block: bytes) -> None:
    fields = _NUMERIC_FIELDS + (_OLD_GNU_SPARSE_FIELDS if block[156:157] == tarfile.GNUTYPE_SPARSE else ())
    for start, end in fields:
        if _octal(block[start:end]) is None:
            raise tarfile.InvalidHeaderError(  # type: ignore[attr-defined]
                f"a numeric field (bytes {start}-{end}) that tar readers read differently: "
                f"{block[start:end]!r}"
            )


def _old_gnu_sparse_map(block: bytes, start: int, entries: int) -> list[tuple[int, int]]:
    """The (offset, length) pairs of an old GNU sparse map in ``block``, read as GNU tar
    and Go do: up to the first entry whose offset field starts with a NUL.  (tarfile
    reads past such an entry, and drops zero pairs in extension blocks: the file's
    data would be placed elsewhere than Docker places it.)"""
    regions: list[tuple[int, int]] = []
    for i in range(entries):
        pos = start + 24 * i
        if block[pos] == 0:
            if block[pos:start + 24 * entries].strip(b"\x00"):
                raise tarfile.InvalidHeaderError("an old GNU sparse map goes on after its end")  # type: ignore[attr-defined]
            break
        offset, length = _octal(block[pos:pos + 12]), _octal(block[pos + 12:pos + 24])
        if offset is None or length is None:
            raise tarfile.InvalidHeaderError("an invalid old GNU sparse map entry")  # type: ignore[attr-defined]
        regions.append((offset, length))
    return regions


def _fast_header(block: bytes, offset: int) -> tarfile.TarInfo | None:
    """Decode a plain header (no pax/GNU extension) the way tarfile's frombuf does, 3-4x
    faster; None whenever anything is unusual, and tarfile decodes it instead."""
    (name, mode, uid, gid, size, mtime, chksum, type_, linkname, _magic, _version, _uname, _gname,
     devmajor, devminor, prefix) = _USTAR.unpack(block)
    if type_ not in _PLAIN_TYPES:
        return None
    numbers = [_octal(f) for f in (chksum, mode, uid, gid, size, mtime, devmajor, devminor)]
    if None in numbers:
        return None  # tarfile's decoder says what is wrong
    if numbers[0] != 256 + sum(block) - sum(block[148:156]):
        return None  # tarfile also accepts signed-char checksums, or explains
    try:
        ti = tarfile.TarInfo(name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
    except ValueError:
        return None
    ti.mode, ti.uid, ti.gid, ti.size, ti.mtime, ti.devmajor, ti.devminor = numbers[1:]  # type: ignore[assignment]
    ti.chksum = 0
    ti.type = type_
    ti.linkname = linkname.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if type_ == tarfile.AREGTYPE and ti.name.endswith("/"):
        ti.type = tarfile.DIRTYPE
    if ti.type == tarfile.DIRTYPE:
        ti.name = ti.name.rstrip("/")
    prefix_text = prefix.split(b"\0", 1)[0] if _magic == _USTAR_MAGIC else b""  # (as Go reads it)
    if prefix_text:
        ti.name = prefix_text.decode("utf-8", "surrogateescape") + "/" + ti.name
    ti.offset = offset
    ti.offset_data = offset + BLOCK
    return ti


_PAX_INTEGERS = frozenset((b"size", b"uid", b"gid", b"GNU.sparse.size", b"GNU.sparse.realsize"))
_PAX_TIMES = frozenset((b"mtime", b"atime", b"ctime"))
#: the extended header types; one may not follow another ``x`` (see _TarInfo)
_EXTENDED_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_GNU_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


def _int64(text: bytes, *, signed: bool = False) -> bool:
    """Whether ``text`` is a decimal Go's strconv.ParseInt(text, 10, 64) takes (tarfile
    would read anything else, even 5000 zeros before a 1000, as 0)."""
    if signed and text[:1] == b"-":
        text = text[1:]
    return text.isdigit() and len(text.lstrip(b"0")) <= 19 and int(text) < 1 << 63


def _pax_value_ok(key: bytes, value: bytes) -> bool:
    if key in _PAX_INTEGERS:
        return _int64(value)
    if key in _PAX_TIMES:  # seconds, with an optional fraction, as Go's parsePAXTime
        seconds, dot, fraction = value.partition(b".")
        return _int64(seconds, signed=True) and (not dot or fraction.isdigit())
    return True


def _pax_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """The ``LENGTH KEY=VALUE\\n`` records of a pax header, in linear time and framed as
    strictly as Go's archive/tar (Docker, containerd, umoci) reads them: anything else
    is an invalid header, not (as for tarfile) the silent end of the records."""
    out: list[tuple[bytes, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0  # bytes.isdigit: ASCII digits only
        stop = pos + length
        if length < 5 or stop > end or data[stop - 1] != 0x0A:
            raise tarfile.InvalidHeaderError(f"malformed pax record at byte {pos}")  # type: ignore[attr-defined]
        key, equals, value = data[space + 1:stop - 1].partition(b"=")
        if not key or not equals or not _pax_value_ok(key, value):
            raise tarfile.InvalidHeaderError(  # type: ignore[attr-defined]
                f"invalid pax record {key[:100]!r} at byte {pos}"
            )
        out.append((key, value))
        pos = stop
    return out


_USTAR_MAGIC = b"ustar\x00"
#: the types whose members have no data to Go's reader (isHeaderOnlyType)
_HEADER_ONLY = frozenset((tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                          tarfile.DIRTYPE, tarfile.FIFOTYPE))  # fmt: skip


def _go_reads_as_sparse(headers: dict[str, str]) -> bool:
    """Whether Go's archive/tar takes a pax member for a GNU sparse file: versions 0.0 and
    0.1 by their map (0.0's offset/numbytes records make one), 1.0 by its version records;
    an unknown version is not sparse to it."""
    major, minor = headers.get("GNU.sparse.major"), headers.get("GNU.sparse.minor")
    if (major, minor) in (("0", "0"), ("0", "1"), ("1", "0")):
        return True
    if major is not None or minor is not None:
        return False
    return bool(headers.get("GNU.sparse.map")) or "GNU.sparse.offset" in headers


def _name_replaced(member: tarfile.TarInfo, name: str) -> None:
    """A type-'\0' header whose own name ends in "/" (a directory to tarfile, without data)
    given a long or pax name that does not: a file with data to Go."""
    if getattr(member, "_old_style_dir", False) and not name.endswith("/"):
        raise tarfile.InvalidHeaderError(  # type: ignore[attr-defined]
            "a member that is a directory to some tar readers and a file to others"
        )


class _TarInfo(tarfile.TarInfo):
    """tarfile's TarInfo with ember's own pax header parsing.

    tarfile (CPython 3.11.7) finds records and a ``hdrcharset`` with regular
    expressions that take quadratic time on a long run of digits (CVE-2024-6232:
    16 MiB of them, ~16 KiB gzipped, would keep the applier busy for days), and
    it applies a global header (``g``) to every member after it, where Go's
    archive/tar, and so Docker, containerd and umoci, ignore global headers:
    the same layer would not give the same files.  Here records are parsed in
    one pass and global headers are skipped, as Go does; the rest (sparse
    formats, applying the records to the next member) is tarfile's.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _TarInfo:
        """tarfile's decoding of one header block, refused where Go would read its numbers
        otherwise, with an old GNU sparse map read as Go reads it."""
        if len(buf) == BLOCK and buf.count(0) != BLOCK:  # (tarfile's own word on those)
            _check_numeric_fields(bytes(buf))
        info = super().frombuf(buf, encoding, errors)
        raw = bytes(buf)
        prefix = tarfile.nts(raw[345:500], encoding, errors)  # type: ignore[attr-defined]
        if prefix and raw[257:263] != _USTAR_MAGIC and info.name.startswith(prefix + "/"):
            # tarfile joins the prefix field whatever the magic; Go only for ustar (in GNU
            # headers those bytes are atime and ctime: `tar --format=gnu -G` output)
            info.name = info.name[len(prefix) + 1 :]
        # type '\0' with a name ending in "/": a directory to tarfile by this name, to Go
        # by the final one (a long or pax name may end otherwise: ``_name_replaced``)
        info._old_style_dir = raw[156:157] == tarfile.AREGTYPE and info.type == tarfile.DIRTYPE  # type: ignore[attr-defined]
        if info.type == tarfile.GNUTYPE_SPARSE:
            _, extended, real_size = info._sparse_structs  # type: ignore[attr-defined]
            info._sparse_structs = (_old_gnu_sparse_map(bytes(buf), 386, 4), extended, real_size)  # type: ignore[attr-defined]
        return info

    def _proc_sparse(self, tf: Any) -> tarfile.TarInfo:
        """An old GNU sparse member: its map's extension blocks, read as Go reads them."""
        regions, extended, real_size = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        while extended:
            block = tf.fileobj.read(BLOCK)
            if len(block) < BLOCK:
                raise _TruncatedHeader("truncated old GNU sparse map")
            regions += _old_gnu_sparse_map(block, 0, 21)
            extended = bool(block[504])
        self.sparse = regions
        self.offset_data = tf.fileobj.tell()
        tf.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = real_size
        return self

    def _proc_gnulong(self, tf: Any) -> tarfile.TarInfo:
        """A GNU long name (``L``) or link name (``K``) and the member it names.

        Two of a kind in a row are refused: tarfile keeps the first, Go the last."""
        buf = tf.fileobj.read(self._block(self.size))  # type: ignore[attr-defined]
        if len(buf) < self.size:
            raise _TruncatedHeader("truncated GNU long name")
        following = tf.fileobj.peek_filled(BLOCK)[156:157]
        if following == self.type:
            raise tarfile.InvalidHeaderError("two GNU long names of one kind for one member")  # type: ignore[attr-defined]
        if following == tarfile.XGLTYPE:
            # Go returns the g as an entry of its own and forgets the long name
            raise tarfile.InvalidHeaderError("a GNU long name followed by a global header")  # type: ignore[attr-defined]
        try:
            member: tarfile.TarInfo = self.fromtarfile(tf)
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None  # type: ignore[attr-defined]
        # another of the same kind further down the chain (L, K, L): tarfile keeps this
        # one, Go the last
        seen: frozenset[bytes] = getattr(member, "_gnu_long", frozenset())
        if self.type in seen:
            raise tarfile.InvalidHeaderError("two GNU long names of one kind for one member")  # type: ignore[attr-defined]
        member._gnu_long = seen | {self.type}  # type: ignore[attr-defined]
        member.offset = self.offset
        text = tarfile.nts(buf, tf.encoding, tf.errors)  # type: ignore[attr-defined]
        if self.type == tarfile.GNUTYPE_LONGNAME:
            _name_replaced(member, text)
            member.name = text
        else:
            member.linkname = text
        if member.isdir():
            member.name = member.name.removesuffix("/")
        return member

    def _proc_pax(self, tf: Any) -> tarfile.TarInfo:
        if self.type == tarfile.SOLARIS_XHDTYPE:
            # Go returns it as an entry of its own, which containerd and Docker refuse
            raise tarfile.InvalidHeaderError("a Solaris extended header (type X)")  # type: ignore[attr-defined]
        buf = tf.fileobj.read(self._block(self.size))  # type: ignore[attr-defined]
        if len(buf) < self.size:
            raise _TruncatedHeader("truncated pax header")
        records = _pax_records(buf[: self.size])
        following = tf.fileobj.peek_filled(BLOCK)[156:157]
        if self.type == tarfile.XHDTYPE and following in _EXTENDED_TYPES:
            # Go keeps the last of two x headers (tarfile the first) and drops an x that a
            # g follows: no writer makes either, and no reading of them is the right one
            raise tarfile.InvalidHeaderError("an extended header followed by another")  # type: ignore[attr-defined]
        if self.type == tarfile.XHDTYPE and following in _GNU_LONG_TYPES:
            # a name in both: tarfile takes the pax one, Go the GNU one
            raise tarfile.InvalidHeaderError("an extended header followed by a GNU long name")  # type: ignore[attr-defined]
        try:
            member: tarfile.TarInfo = self.fromtarfile(tf)
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None  # type: ignore[attr-defined]
        if self.type == tarfile.XGLTYPE:
            return member
        data_start, header_size = member.offset_data, member.size
        headers = {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
                   for k, v in records}
        sparse = _go_reads_as_sparse(headers)
        if not sparse and any(k.startswith("GNU.sparse.") for k in headers):
            # tarfile applies GNU.sparse.size, .realsize and .name to any member; Go only
            # to one it takes for sparse: the same bytes, another size or name
            raise tarfile.InvalidHeaderError("GNU sparse records on a member that is not sparse")  # type: ignore[attr-defined]
        if sparse and len({headers.get("GNU.sparse.size"), headers.get("GNU.sparse.realsize")} - {None}) > 1:
            # tarfile takes the later one, Go GNU.sparse.size
            raise tarfile.InvalidHeaderError("two different sizes of a sparse member")  # type: ignore[attr-defined]
        if "path" in headers:
            _name_replaced(member, headers["path"])
        if "GNU.sparse.map" in headers:  # GNU sparse 0.1
            self._proc_gnusparse_01(member, headers)  # type: ignore[attr-defined]
        elif "GNU.sparse.size" in headers:  # GNU sparse 0.0: offset/numbytes records in order
            offsets = [int(v) for k, v in records if k == b"GNU.sparse.offset"]
            lengths = [int(v) for k, v in records if k == b"GNU.sparse.numbytes"]
            member.sparse = list(zip(offsets, lengths, strict=False))  # type: ignore[assignment]
        elif headers.get("GNU.sparse.major") == "1" and headers.get("GNU.sparse.minor") == "0":
            self._proc_gnusparse_10(member, headers, tf)  # type: ignore[attr-defined]
        member._apply_pax_info(headers, tf.encoding, tf.errors)  # type: ignore[attr-defined]
        if sparse and headers.get("GNU.sparse.name"):
            member.name = headers["GNU.sparse.name"]  # Go's choice over path, whatever the order
        if member.type == tarfile.AREGTYPE and headers.get("path", "").endswith("/"):
            member.name += "/"  # tarfile drops the "/" that makes it a directory to Go (TarStream)
        member.offset = self.offset
        if "size" in headers:  # the data of the member ends elsewhere
            offset = member.offset_data
            if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES:
                offset += member._block(member.size)  # type: ignore[attr-defined]
            tf.offset = offset
        # Where Go's reader finds the next header: after the pax size (else the header's)
        # of data, none for header-only types.  Any other framing is refused: the entries
        # after it would not be Docker's.
        stored = 0 if member.type in _HEADER_ONLY else int(headers.get("size", header_size))
        if tf.offset != data_start + self._block(stored):  # type: ignore[attr-defined]
            raise tarfile.InvalidHeaderError("a member whose data Go's tar reader frames otherwise")  # type: ignore[attr-defined]
        return member


class _HeaderSource:
    """The attributes of a TarFile that ``TarInfo.fromtarfile`` uses."""

    def __init__(self, reader: PipeReader) -> None:
        self.fileobj = reader
        self.encoding = "utf-8"
        # surrogateescape round-trips any bytes: names and xattr values come back
        # exactly with .encode("utf-8", "surrogateescape").
        self.errors = "surrogateescape"
        self.pax_headers: dict[str, str] = {}
        self.offset = 0


class _End(Exception):
    """The archive ended (zero block, or EOF on a header boundary)."""


class Entry:
    """One member of the archive plus where its data lies in the stream."""

    __slots__ = ("info", "data_size", "next_offset", "regions")

    def __init__(self, info: tarfile.TarInfo, data_size: int, next_offset: int,
                 regions: list[tuple[int, int]] | None) -> None:
        self.info = info
        self.data_size = data_size  # bytes of file data stored in the archive
        self.next_offset = next_offset
        #: for sparse members, (offset, length) of each stored region in the real file
        self.regions = regions


def _validate_sparse(info: tarfile.TarInfo, stored: int) -> list[tuple[int, int]]:
    regions: list[tuple[int, int]] = []
    total = 0
    sparse: list[tuple[int, int]] = info.sparse or []  # type: ignore[assignment]  # typeshed is wrong
    for off, length in sparse:
        regions.append((off, length))
        if off < 0 or length < 0 or off + length > info.size:
            raise InvalidLayer(f"sparse file {info.name[:200]!r} has a region outside its size")
        total += length
    if total > stored:
        raise InvalidLayer(f"sparse file {info.name[:200]!r} declares more data than the archive holds")
    return regions


class TarStream:
    """Iterate entries; the consumer reads an entry's data with ``reader.chunks(entry.data_size)``
    (or not at all) before asking for the next one."""

    def __init__(self, reader: PipeReader) -> None:
        self.reader = reader
        self._src = _HeaderSource(reader)
        self.ended_cleanly = False

    def __iter__(self) -> Iterator[Entry]:
        reader = self.reader
        src = self._src
        while True:
            reader.header_budget = MAX_HEADER_BYTES
            start = reader.tell()
            block = reader.peek(BLOCK)
            fast = _fast_header(block, start) if block is not None and block[156:157] in _PLAIN_TYPES else None
            if fast is not None:
                reader.advance(BLOCK)
                info = fast
                src.offset = info.offset_data + (-(-info.size // BLOCK) * BLOCK if info.type in _DATA_TYPES else 0)
            else:
                try:
                    info = self._slow_header(start)
                except _End:
                    self.ended_cleanly = True
                    return
            here = reader.tell()
            if info.offset_data != here:
                raise InvalidLayer(f"tar entry {info.name[:200]!r} has an inconsistent data offset")
            if not 0 <= info.size < 1 << 63:  # Go's int64
                raise InvalidLayer(f"tar entry {info.name[:200]!r} has an invalid size ({info.size})")
            if info.type == tarfile.AREGTYPE and info.name.endswith("/"):
                # A long or pax name ending in "/" on a type-'\0' member: Go reads a
                # directory, with no data, where tarfile reads a file and skips its data
                if info.size:
                    raise InvalidLayer(
                        f"tar entry {info.name[:200]!r} is a directory to some tar readers and a "
                        "file to others"
                    )
                info.type = tarfile.DIRTYPE
                info.name = info.name.rstrip("/")
            next_offset = src.offset
            stored = next_offset - here
            if stored < 0:
                raise InvalidLayer(f"tar entry {info.name[:200]!r} has an inconsistent size")
            regions: list[tuple[int, int]] | None = None
            if info.sparse is not None:
                regions = _validate_sparse(info, stored)
                data_size = sum(length for _, length in regions)
            elif info.isreg():
                data_size = info.size
                if data_size > stored:
                    raise InvalidLayer(f"tar entry {info.name[:200]!r} has an inconsistent size")
            else:
                data_size = 0
            yield Entry(info, data_size, next_offset, regions)
            reader.skip_to(next_offset)

    def _slow_header(self, start: int) -> tarfile.TarInfo:
        """tarfile's decoder for everything else: pax, GNU long names, sparse, end of archive."""
        try:
            info: tarfile.TarInfo = _TarInfo.fromtarfile(self._src)  # type: ignore[arg-type]
            return info
        except _EOFHeader:
            # A zero block ends the archive if what follows is another or nothing; Go's
            # reader refuses anything else there, so must we (entries after it would be
            # files only Docker does not see)
            after = self.reader.peek_filled(BLOCK)
            if after and after != bytes(BLOCK):
                raise InvalidLayer(
                    f"{self.reader.subject} has entries after a zero block (offset {start}): "
                    "not a valid tar archive"
                ) from None
            raise _End from None
        except _EmptyHeader:
            # The stream stopped on a header boundary without the zero blocks;
            # Go's archive/tar (Docker, containerd) accepts that as the end, so do we.
            raise _End from None
        except _TruncatedHeader:
            raise InvalidLayer(
                f"{self.reader.subject} ends in the middle of a tar header (offset {start})"
            ) from None
        except (tarfile.HeaderError, ValueError, UnicodeError) as e:
            raise InvalidLayer(f"invalid tar header at offset {start}: {e}") from None
        except RecursionError:
            raise InvalidLayer(f"tar entry at offset {start} chains too many extended headers") from None
        except Exception as e:
            # whatever else tarfile's decoding of a hostile header raises (IndexError on
            # a truncated sparse map, OverflowError): the archive is bad, say so
            raise InvalidLayer(f"invalid tar header at offset {start}: {type(e).__name__}: {e}") from None
