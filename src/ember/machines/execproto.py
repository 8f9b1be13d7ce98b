"""The exec port's frames (pure): what ``ember exec`` and ember-init say to each other.

One session per exec port (docs/guest.md, "Exec").  A frame is a type byte, a
4-byte big-endian payload length and the payload.  The host sends ``O`` (open:
the request), ``I`` (stdin bytes), ``C`` (stdin ends), ``S`` (a signal for the
command, 4 bytes), ``W`` (its terminal's new size: rows and columns, 2 bytes each);
the guest answers ``N`` (started: the request's nonce) or
``R`` (refused: the request's nonce, a NUL, why), then ``o``/``e`` (stdout, stderr bytes) and ``X`` (the exit
code, 4 bytes: 128 + N for a command killed by signal N).  An attach request (``m``)
runs nothing: its ``I``/``C``/``W``/``S`` go to the machine's program, whose output the
host reads from the machine's log.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ember.machines.errors import ExecProtocolError

OPEN, STDIN, STDIN_END, SIGNAL, RESIZE = b"O", b"I", b"C", b"S", b"W"
STARTED, REFUSED, STDOUT, STDERR, EXIT = b"N", b"R", b"o", b"e", b"X"
_HEADER = struct.Struct(">cI")
#: the longest frame the guest takes (init/src/exec.c FRAME_IN_MAX)
MAX_IN = 128 * 1024
#: the longest the guest sends (one virtio-serial write)
MAX_OUT = 32 * 1024
#: stdin bytes per frame
STDIN_CHUNK = 32 * 1024


@dataclass(frozen=True)
class ExecRequest:
    argv: Sequence[str]
    #: ``KEY=VALUE`` entries over the program's environment
    env: Sequence[str] = ()
    #: the user (``NAME|UID[:GROUP|GID]``); empty: the program's
    user: str = ""
    #: absolute; empty: the program's working directory
    workdir: str = ""
    stdin: bool = False
    detach: bool = False
    nonce: str = ""
    #: a terminal of (rows, columns) for the command (``-t``): its output all comes as
    #: stdout then
    tty: tuple[int, int] | None = None
    #: attach to the machine's program's own stdin (``run -i``, ``ember attach``) instead
    #: of running a command: ``argv`` and the command's settings stay empty
    attach: bool = False

    def encode(self) -> bytes:
        """The ``O`` frame.  ValueError when it cannot be one (a NUL in a string, too long)."""
        fields = [b"a" + _text(a) for a in self.argv]
        fields += [b"e" + _text(e) for e in self.env]
        if self.user:
            fields.append(b"u" + _text(self.user))
        if self.workdir:
            fields.append(b"w" + _text(self.workdir))
        if self.stdin:
            fields.append(b"i")
        if self.detach:
            fields.append(b"d")
        if self.attach:
            fields.append(b"m")
        if self.nonce:
            fields.append(b"n" + _text(self.nonce))
        if self.tty is not None:
            rows, cols = (max(0, min(v, 0xFFFF)) for v in self.tty)
            fields.append(f"t{rows} {cols}".encode())
        payload = b"".join(f + b"\0" for f in fields)
        if len(payload) > MAX_IN:
            raise ValueError(f"the command and its environment take more than {MAX_IN >> 10} KiB")
        return frame(OPEN, payload)


def _text(s: str) -> bytes:
    data = s.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise ValueError(f"{s[:60]!r} holds a NUL byte")
    return data


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def stdin_frames(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), STDIN_CHUNK):
        yield frame(STDIN, data[i : i + STDIN_CHUNK])


def signal_frame(signum: int) -> bytes:
    return frame(SIGNAL, struct.pack(">I", signum))


def resize_frame(rows: int, cols: int) -> bytes:
    return frame(RESIZE, struct.pack(">HH", max(0, min(rows, 0xFFFF)), max(0, min(cols, 0xFFFF))))


def refusal(payload: bytes) -> tuple[str, str]:
    """An ``R`` frame's nonce (empty: the guest could not tell it) and message."""
    nonce, _, why = payload.partition(b"\0")
    return nonce.decode("ascii", "replace"), why.decode("utf-8", "replace")


def exit_code(payload: bytes) -> int:
    if len(payload) != 4:
        raise ExecProtocolError("malformed exit frame")
    return int(struct.unpack(">I", payload)[0]) & 0xFF


class FrameReader:
    """Frames out of a byte stream fed in pieces."""

    def __init__(self, limit: int = MAX_OUT) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buf)
            if length > self._limit:
                raise ExecProtocolError(f"a frame of {length} bytes (at most {self._limit})")
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            out.append((kind, bytes(self._buf[_HEADER.size : end])))
            del self._buf[:end]
        return out
