"""The agent's wire format: pure encoding and decoding, no sockets.

One connection carries one command.  Every message is a frame: a 4-byte
big-endian length, then the payload.  The client's first frame is the request
(sent together with its stdin, stdout and stderr as SCM_RIGHTS descriptors);
after that the agent answers once with *declined* or *started*, the client may
send *signal* frames, and the agent ends with *exited*.

The request is NUL-separated bytes, not JSON: argv and the environment are
bytes on Linux (not necessarily UTF-8), cannot contain NUL, and the client must
build the request without importing anything (the ``json`` module's imports
alone cost a few ms of the start-up this agent exists to remove).

    request  = MAGIC \\0 code \\0 cwd \\0 umask-octal \\0 argc \\0 argv... \\0 env-entries...

``code`` is the file of the client's ``ember.agent.client`` module: an agent
started from another installation of ember (another virtualenv, another
checkout on ``PYTHONPATH``) declines rather than run its own code.
    declined = b"D" reason (UTF-8)         the client runs the command itself
    started  = b"S" pid                    the command runs in the agent
    signal   = b"K" signal-number          client -> agent: deliver to the command
    exited   = b"X" exit-code b" " signal  signal is 0 unless the command died of one

This module must stay importable with nothing but the standard library's
built-ins: the ``ember`` entry point imports it before anything else.
"""

from __future__ import annotations

MAGIC = b"EMBER-AGENT/1"
HEADER = 4
MAX_FRAME = 1 << 20  # argv + environment; Linux's own ARG_MAX is 2 MiB for both
MAX_ARGS = 4096
# Signals a client may forward; anything else in a signal frame is refused.
FORWARDED_SIGNALS = (1, 2, 3, 10, 12, 15, 28)  # HUP INT QUIT USR1 USR2 TERM WINCH


class ProtocolError(Exception):
    """A frame or request that does not follow the format (the peer is broken or hostile)."""


class Request:
    __slots__ = ("argv", "code", "cwd", "env", "umask")

    def __init__(
        self, argv: list[bytes], cwd: bytes, env: list[bytes], umask: int, code: bytes = b"/"
    ) -> None:
        self.argv = argv
        self.code = code
        self.cwd = cwd
        self.env = env
        self.umask = umask

    def environment(self) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for entry in self.env:
            key, _, value = entry.partition(b"=")
            out[key] = value
        return out


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"a frame of {len(payload)} bytes is larger than {MAX_FRAME}")
    return len(payload).to_bytes(HEADER, "big") + payload


def frame_length(header: bytes) -> int:
    n = int.from_bytes(header, "big")
    if n > MAX_FRAME:
        raise ProtocolError(f"a frame of {n} bytes is larger than {MAX_FRAME}")
    return n


def encode_request(request: Request) -> bytes:
    fields = [
        MAGIC,
        request.code,
        request.cwd,
        b"%o" % request.umask,
        b"%d" % len(request.argv),
        *request.argv,
        *request.env,
    ]
    if any(b"\0" in f for f in fields):
        raise ProtocolError("an argument or environment entry contains a NUL byte")
    return b"\0".join(fields)


def decode_request(payload: bytes) -> Request:
    fields = payload.split(b"\0")
    if len(fields) < 5 or fields[0] != MAGIC:
        raise ProtocolError("not an ember agent request (or another version of ember)")
    code, cwd, umask_text, argc_text = fields[1], fields[2], fields[3], fields[4]
    if not cwd.startswith(b"/") or not code.startswith(b"/"):
        raise ProtocolError("the working directory and the code must be absolute paths")
    if not _digits(umask_text, "01234567") or int(umask_text, 8) > 0o777:
        raise ProtocolError("bad umask")
    if not _digits(argc_text, "0123456789") or int(argc_text) > MAX_ARGS:
        raise ProtocolError("bad argument count")
    argc = int(argc_text)
    if len(fields) < 5 + argc:
        raise ProtocolError("fewer arguments than announced")
    argv, env = fields[5 : 5 + argc], fields[5 + argc :]
    if env == [b""]:  # an empty environment encodes as one empty field
        env = []
    for entry in env:
        key, eq, _ = entry.partition(b"=")
        if not eq or not key:
            raise ProtocolError("an environment entry is not NAME=VALUE")
    return Request(argv, cwd, env, int(umask_text, 8), code)


def _digits(text: bytes, alphabet: str) -> bool:
    return 0 < len(text) <= 12 and all(chr(c) in alphabet for c in text)


def declined(reason: str) -> bytes:
    return b"D" + reason.encode("utf-8", "replace")


def started(pid: int) -> bytes:
    return b"S%d" % pid


def signal_message(signum: int) -> bytes:
    return b"K%d" % signum


def exited(code: int, signum: int = 0) -> bytes:
    return b"X%d %d" % (code, signum)


def parse_signal(payload: bytes) -> int:
    """The signal a client asks to forward; only the ones a terminal or a shell sends."""
    if payload[:1] != b"K" or not _digits(payload[1:], "0123456789"):
        raise ProtocolError("not a signal message")
    signum = int(payload[1:])
    if signum not in FORWARDED_SIGNALS:
        raise ProtocolError(f"signal {signum} is not one a client may forward")
    return signum


def parse_exited(payload: bytes) -> tuple[int, int]:
    code, _, signum = payload[1:].partition(b" ")
    try:
        return int(code), int(signum)
    except ValueError:
        raise ProtocolError("bad exit message") from None
