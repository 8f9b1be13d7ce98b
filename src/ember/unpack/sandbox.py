"""Running the applier in a forked child chroot-ed into the target root.

The parent opens the blob, decompresses it (ISA-L gzip in a helper thread, or
zstd), hashes the uncompressed stream for the DiffID and writes it into a
pipe; the child, chroot-ed into the root, parses and applies the tar from the
other end of that pipe.  The two run on different cores at the same time.

Why a chroot: every path the child touches is resolved by the kernel inside
the root, so no archive (absolute or ``..`` symlinks, symlinked parents,
hard links out, whiteouts through links) can make it write outside.  The
child keeps only three descriptors (the data pipe, the report pipe and
/dev/null as stdio): no directory descriptor from outside survives that
``fchdir`` could use to walk back out.

The child reports one JSON object on a second pipe: its counters, or the
error class and message.  Anything else (a crash, a signal) is reported by
the parent from the wait status.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import signal
import traceback
from collections.abc import Callable
from contextlib import suppress
from typing import Protocol

from ember.unpack.applier import LayerApplier
from ember.unpack.errors import InvalidLayer, UnpackError
from ember.unpack.tarstream import PipeReader, TarStream

PIPE_SIZE = 1 << 20
CHUNK = 1 << 20
_REPORT_LIMIT = 8192


class ChunkSource(Protocol):
    def readinto(self, buf: memoryview, /) -> int: ...
    def __enter__(self) -> ChunkSource: ...
    def __exit__(self, *exc: object) -> None: ...


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


def _close_all_but(keep: set[int]) -> None:
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    # close_range(2) makes a huge upper bound free; never less than the fd limit
    os.closerange(low, max(os.sysconf("SC_OPEN_MAX"), 1 << 20))


def _child(root_fd: int, data_fd: int, report_fd: int) -> None:
    """Never returns: applies the tar on ``data_fd`` inside the root and ``_exit``s."""
    code = 1
    report: dict[str, object]
    try:
        # The parent's objects stay alive in this copy of its heap; a collection
        # could close a file object whose descriptor number we have since reused.
        gc.disable()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _close_all_but({root_fd, data_fd, report_fd})
        expected = os.fstat(root_fd)
        os.fchdir(root_fd)
        os.chroot(".")
        os.chdir("/")
        os.close(root_fd)
        # The applier works on absolute paths: refuse to start unless "/" really is
        # the target root now (a belt-and-braces check on the lines above).
        here = os.stat("/")
        if (here.st_dev, here.st_ino) != (expected.st_dev, expected.st_ino):
            raise UnpackError("the layer applier is not confined to the target root; refusing to apply")
        os.umask(0)
        stream = TarStream(PipeReader(data_fd))
        counts = LayerApplier().apply(stream)
        stream.reader.drain()
        report = {"ok": True, "counts": counts}
        code = 0
    except InvalidLayer as e:
        report = {"ok": False, "kind": "invalid", "message": e.message}
    except UnpackError as e:
        report = {"ok": False, "kind": "unpack", "message": e.message}
    except PermissionError as e:
        report = {"ok": False, "kind": "unpack",
                  "message": f"cannot enter the target root ({e.strerror}): applying layers needs root"}
    except OSError as e:
        report = {"ok": False, "kind": "unpack", "message": f"{e.strerror or e}"}
    except BaseException as e:  # a bug: say where, the parent raises it as an UnpackError
        tb = traceback.extract_tb(e.__traceback__)[-3:]
        where = "; ".join(f"{f.name}:{f.lineno}" for f in tb)
        report = {"ok": False, "kind": "unpack",
                  "message": f"internal error in the layer applier: {type(e).__name__}: {e} [{where}]"}
    try:
        if isinstance(report.get("message"), str):  # keep the JSON whole and under the limit
            report["message"] = str(report["message"])[:2000]
        data = json.dumps(report).encode()
        while data:
            data = data[os.write(report_fd, data):]
    finally:
        os._exit(code)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def apply_stream(root: str | os.PathLike[str], open_source: Callable[[], ChunkSource],
                 hasher: _Hasher, describe: str) -> tuple[dict[str, int], int]:
    """Apply the uncompressed tar from ``open_source()`` onto ``root`` in a chroot-ed child.

    ``open_source`` runs in the parent *after* the fork, so helper threads it
    starts never exist in the child.  Returns the child's counters and the
    number of bytes streamed.  Raises InvalidLayer/UnpackError from either side;
    a failure to read or decompress the blob (``describe`` names it) wins over
    the truncation the child then sees.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        data_r, data_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
    except BaseException:
        os.close(root_fd)
        raise
    with suppress(OSError):  # a smaller pipe only costs a few more context switches
        fcntl.fcntl(data_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    pid = os.fork()
    if pid == 0:
        _child(root_fd, data_r, report_w)
    os.close(root_fd)
    os.close(data_r)
    os.close(report_w)

    total = 0
    source_error: BaseException | None = None
    try:
        try:
            with open_source() as source:
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                while True:
                    n = source.readinto(view)
                    if not n:
                        break
                    chunk = view[:n]
                    hasher.update(chunk)
                    total += n
                    _write_all(data_w, chunk)
        except BrokenPipeError:
            pass  # the child stopped reading: its report says why
        except (KeyboardInterrupt, SystemExit):
            os.kill(pid, signal.SIGKILL)
            raise
        except Exception as e:  # corrupt compressed data, unreadable blob
            source_error = e
        finally:
            os.close(data_w)
        raw = b""
        while chunk_r := os.read(report_r, _REPORT_LIMIT):
            raw += chunk_r
    finally:
        os.close(report_r)
        _, status = os.waitpid(pid, 0)

    if source_error is not None:
        if isinstance(source_error, UnpackError):
            raise source_error
        raise InvalidLayer(f"cannot read {describe}: {source_error}") from None
    try:
        report = json.loads(raw) if raw else None
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise UnpackError(f"the layer applier for {describe} {_describe_status(status)} without a report")
    if not report.get("ok"):
        cls = InvalidLayer if report.get("kind") == "invalid" else UnpackError
        raise cls(f"{describe}: {report.get('message')}")
    counts = report.get("counts")
    if status != 0 or not isinstance(counts, dict):
        raise UnpackError(f"the layer applier for {describe} {_describe_status(status)}")
    return {str(k): int(v) for k, v in counts.items()}, total
