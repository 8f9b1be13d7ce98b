"""Running the applier in a forked child chroot-ed into the target root.

The parent opens each blob, decompresses it (ISA-L gzip in a helper thread, or
zstd), hashes the uncompressed stream for the DiffID and writes it into a
pipe; the child, chroot-ed into the root, parses and applies the tar from the
other end of that pipe.  The two run on different cores at the same time.
One child applies a whole run of layers (one pipe each, created before the
fork), which saves a fork, an exit and several process hand-offs per layer.

Why a chroot: every path the child touches is resolved by the kernel inside
the root, so no archive (absolute or ``..`` symlinks, symlinked parents,
hard links out, whiteouts through links) can make it write outside.  The
child keeps only pipes and /dev/null (a data pipe per layer, each closed
after its layer, the report pipe, /dev/null as stdio): no directory descriptor
from outside survives that ``fchdir`` could use to walk back out.

The child reports one JSON line per layer on a second pipe: its counters,
or the error class and message (and then exits).  Anything else (a crash, a signal) is reported by
the parent from the wait status.
"""

from __future__ import annotations

import fcntl
import gc
import importlib.machinery
import json
import linecache
import os
import signal
import socket
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from typing import Protocol

from ember import jsonutil, process
from ember.errors import EmberError
from ember.fsutil import write_all
from ember.process import reap_exited, reap_later
from ember.unpack.applier import LayerApplier
from ember.unpack.errors import InvalidLayer, UnpackError
from ember.unpack.tarstream import PipeReader, TarStream

PIPE_SIZE = 1 << 20
CHUNK = 1 << 20
_REPORT_LIMIT = 8192
#: layers applied by one child (each holds a pipe open until its turn)
MAX_LAYERS_PER_CHILD = 64


class ChunkSource(Protocol):
    def readinto(self, buf: memoryview, /) -> int: ...
    def settle(self) -> None:
        """After the child stopped reading: raise what was wrong with the bytes on their
        way in, if anything (see UncompressedReader.settle)."""
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


def _report(fd: int, report: dict[str, object]) -> None:
    if isinstance(report.get("message"), str):  # keep each JSON line whole and short
        report["message"] = str(report["message"])[:2000]
    data = json.dumps(report).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


def detach_from_parent(keep: set[int]) -> None:
    """First steps of every applier child: no collector, default SIGINT and SIGTERM,
    /dev/null as stdio, nothing open but ``keep``, an interpreter that reads no file
    of its own accord (``_seal_interpreter``)."""
    # The parent's objects stay alive in this copy of its heap; a collection
    # could close a file object whose descriptor number we have since reused.
    gc.disable()
    # the CLI's handlers raise into Python code; this child just dies, and its
    # parent cleans up
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _close_all_but(keep)
    _seal_interpreter()


def _no_source_lines(filename: str, module_globals: object = None) -> list[str]:
    return []


def _seal_interpreter() -> None:
    """Leave the interpreter nothing that reads a file the applier did not open itself.

    Inside the chroot every path names what the layers wrote.  A Python that
    imports a module, or looks up a source line for a traceback or a warning,
    reads one: a layer that puts ``usr/lib/python3.11/encodings/x.py`` there and
    a ``# coding: x`` line in the source file of a frame (``tarfile.py``) had its
    code run as root by the lookup of that line, code that could leave the
    chroot; a fifo there hung the child, ``/dev/zero`` filled its memory.  So
    the path-based importer goes (modules already imported stay usable; any
    other import fails: the applier imports nothing once it runs), source lines
    read as absent, warnings and unraisable errors are dropped unformatted.
    """
    sys.meta_path[:] = [f for f in sys.meta_path if f is not importlib.machinery.PathFinder]
    sys.path_importer_cache.clear()
    linecache.clearcache()
    linecache.getlines = _no_source_lines
    linecache.updatecache = _no_source_lines
    warnings.simplefilter("ignore")
    sys.unraisablehook = lambda _unraisable: None


def enter_root(root_fd: int) -> None:
    """chroot into the directory ``root_fd`` and close it: from here on no descriptor
    of a directory outside remains."""
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


def _apply_one(data_fd: int) -> dict[str, int]:
    stream = TarStream(PipeReader(data_fd))
    counts = LayerApplier().apply(stream)
    stream.reader.drain()
    os.close(data_fd)
    return counts


def _failure(e: BaseException) -> dict[str, object]:
    """The report of an applier child that stops on ``e``."""
    if isinstance(e, InvalidLayer):
        return {"ok": False, "kind": "invalid", "message": e.message}
    if isinstance(e, UnpackError):
        return {"ok": False, "kind": "unpack", "message": e.message}
    if isinstance(e, PermissionError):
        return {"ok": False, "kind": "unpack",
                "message": f"cannot enter the target root ({e.strerror}): applying layers needs root"}
    if isinstance(e, OSError):
        return {"ok": False, "kind": "unpack", "message": f"{e.strerror or e}"}
    # a bug: say where, the parent raises it as an UnpackError.  Names and line
    # numbers only: extract_tb would read source files, here the layers' files.
    frames = list(traceback.walk_tb(e.__traceback__))[-3:]
    where = "; ".join(f"{frame.f_code.co_name}:{lineno}" for frame, lineno in frames)
    return {"ok": False, "kind": "unpack",
            "message": f"internal error in the layer applier: {type(e).__name__}: {e} [{where}]"}


def _child(root_fd: int, data_fds: list[int], report_fd: int) -> None:
    """Never returns: applies the tar on each of ``data_fds`` in turn inside the root, then ``_exit``s."""
    code = 1
    try:  # whatever happens below, this process ends here: it never returns to its caller
        report: dict[str, object] | None = None
        try:
            detach_from_parent({root_fd, report_fd, *data_fds})
            enter_root(root_fd)
            os.umask(0)
            for data_fd in data_fds:
                _report(report_fd, {"ok": True, "counts": _apply_one(data_fd)})
            code = 0
        except BaseException as e:
            report = _failure(e)
        if report is not None:
            _report(report_fd, report)
    finally:
        os._exit(code)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


@dataclass(frozen=True)
class LayerStream:
    """One layer as the parent sees it."""

    #: opens the uncompressed stream; runs after the fork, so its threads never exist in the child
    open: Callable[[], ChunkSource]
    hasher: _Hasher
    #: names the layer in messages
    describe: str


def _pump(
    layer: LayerStream, data_w: int, view: memoryview
) -> tuple[int, BaseException | None, ChunkSource | None]:
    """Stream one layer into its pipe (closing it) through the buffer ``view``; returns
    bytes sent, a read error if any, and, when the child stopped reading before the
    end, the layer's source, left open for ``_blamed`` or ``_hash_rest`` (which close it)."""
    total = 0
    try:
        with ExitStack() as stack:
            source = stack.enter_context(layer.open())
            while True:
                n = source.readinto(view)
                if not n:
                    break
                chunk = view[:n]
                layer.hasher.update(chunk)
                total += n
                try:
                    write_all(data_w, chunk)
                except BrokenPipeError:
                    stack.pop_all()  # the child stopped reading: its report says why
                    return total, None, source
    except Exception as e:  # corrupt compressed data, unreadable blob
        return total, e, None
    finally:
        os.close(data_w)
    return total, None, None


def _applied(report: dict[str, object] | None) -> bool:
    """Whether the child's ``report`` says it applied its layer."""
    return report is not None and report.get("ok") is True


def _hash_rest(layer: LayerStream, source: ChunkSource, view: memoryview) -> tuple[int, BaseException | None]:
    """The child applied ``layer`` and stopped reading a little past the end of its
    archive (``PipeReader.drain``): hash the rest of the stream here, since the DiffID
    covers all of it as Docker and containerd read it (the source's expansion budget
    bounds it).  Closes ``source``; returns bytes hashed and a read error, as ``_pump``."""
    total = 0
    try:
        with source:
            while n := source.readinto(view):
                layer.hasher.update(view[:n])
                total += n
    except Exception as e:
        return total, e
    return total, None


def _blamed(report: dict[str, object] | None, cut: ChunkSource) -> BaseException | None:
    """The child stopped reading a layer (``cut``, its source) and sent ``report``: when
    that refuses the layer's bytes, the bytes may have been bad on their way in (a
    download then failing its digest), and that error says it better.  Closes ``cut``.

    Only then: a child that failed on an earlier layer, or for want of room or rights,
    says why itself, without waiting for this layer's download to end."""
    try:
        if report is not None and report.get("kind") == "invalid":
            cut.settle()
    except EmberError as e:
        return e
    except Exception as e:  # as _pump says a source's own failure
        return InvalidLayer(f"cannot read the layer: {e}")
    finally:
        cut.__exit__(None, None, None)
    return None


class _Reports:
    """Reads the child's JSON lines one at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""

    def next(self) -> dict[str, object] | None:
        while b"\n" not in self._buf:
            data = os.read(self.fd, _REPORT_LIMIT)
            if not data:
                return None
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            report = jsonutil.loads(line)
        except ValueError:
            return None
        return report if isinstance(report, dict) else None


def apply_streams(root: str | os.PathLike[str], layers: Sequence[LayerStream],
                  check: Callable[[int], None],
                  done: Callable[[int, dict[str, int], int], None]) -> None:
    """Apply ``layers`` in order onto ``root`` in one chroot-ed child.

    Once layer ``i`` is streamed (its bytes all hashed), ``check(i)`` runs in
    the parent, before one byte of layer ``i+1`` reaches the child; if it
    raises (a DiffID mismatch), nothing more is streamed, the child is stopped
    and nothing more is applied.  The parent then streams layer ``i+1`` while
    the child is still applying layer ``i`` (the child only reads a layer's
    pipe once it has finished the one before).  ``done(i, counts,
    bytes_streamed)`` runs once the child reported layer ``i`` applied.
    Raises InvalidLayer/UnpackError from either side; a failure to read or
    decompress a blob wins over the truncation the child then sees, and the
    child's error for a layer over that layer's failed check.

    The child is the session child forked ahead for this process
    (``fork_spare_session``) if there is one, else one forked now.  Either
    way it has left ``root`` when this returns or raises.
    """
    if not layers:
        return
    spare = _take_spare()
    child: _Child = _QueuedSession(spare, root, len(layers)) if spare else _OneShot(root, len(layers))
    finished = False
    # the layer the child stopped reading, and its source (open until its report is in)
    cut: tuple[int, ChunkSource] | None = None
    # one buffer for every layer: allocating (and first touching) 1 MiB costs ~0.3-1 ms each time
    view = memoryview(bytearray(CHUNK))
    try:
        # Stream every layer, checking each before the next; the child's reports
        # (one short message per layer, MAX_LAYERS_PER_CHILD of them fit in the
        # report channel's buffer) wait meanwhile.
        streamed: list[int] = []
        # the layer that failed on this side: its error, and whether its check failed
        # (else its blob could not be read)
        stop: tuple[int, EmberError, bool] | None = None
        # the child's reports so far, in layer order (read ahead of the loop below when a
        # layer's pipe was cut: whether the child failed or finished that layer)
        reports: list[dict[str, object] | None] = []

        def report_of(i: int) -> dict[str, object] | None:
            while len(reports) <= i:
                reports.append(child.next_report())
            return reports[i]

        for i, layer in enumerate(layers):
            total, source_error, cut_source = _pump(layer, child.pending.pop(0), view)
            streamed.append(total)
            if cut_source is not None:
                # The child stopped reading: it failed (then nothing more goes to it), or
                # it applied the layer and left the bytes after its archive to us
                if not _applied(report_of(i)):
                    cut = (i, cut_source)
                    break
                more, source_error = _hash_rest(layer, cut_source, view)
                streamed[i] += more
            if source_error is not None:
                # ember's own errors (an unreadable blob, a pull that failed while
                # its layers were being applied) say what happened already
                error = (
                    source_error
                    if isinstance(source_error, EmberError)
                    else InvalidLayer(f"cannot read {layer.describe}: {source_error}")
                )
                stop = (i, error, False)
                break
            try:
                check(i)
            except UnpackError as e:
                stop = (i, e, True)
                break
        for i, layer in enumerate(layers[: len(streamed)]):
            report = report_of(i)
            if stop is not None and stop[0] == i and not stop[2]:
                raise stop[1]  # a blob we could not read: the child's view of it says nothing more
            if cut is not None and cut[0] == i:
                _, source = cut
                cut = None
                better = _blamed(report, source)
                if better is not None:
                    raise better
            if report is None:
                status = child.end()
                finished = True
                raise UnpackError(
                    f"the layer applier for {layer.describe} {_describe_status(status)} without a report"
                )
            if not report.get("ok"):
                cls = InvalidLayer if report.get("kind") == "invalid" else UnpackError
                raise cls(f"{layer.describe}: {report.get('message')}")
            if stop is not None and stop[0] == i:
                raise stop[1]
            counts = report.get("counts")
            if not isinstance(counts, dict):
                raise UnpackError(f"the layer applier for {layer.describe} sent a malformed report")
            done(i, {str(k): int(v) for k, v in counts.items()}, streamed[i])
        status = child.end()
        finished = True
        if status != 0:
            raise UnpackError(f"the layer applier {_describe_status(status)}")
    finally:
        if cut is not None:  # its report never came, or an earlier layer's failed
            with suppress(Exception):  # the child below is stopped whatever happens here
                cut[1].__exit__(None, None, None)
        if not finished:
            # An error (or an interrupt) on our side: the child may be applying a
            # layer or waiting for the next one; stop it before closing its pipes
            # (EOF would read as an empty layer, harmless but pointless).
            child.kill()
        child.close()


class _Child:
    """The applier child of one ``apply_streams``, whichever way it was made."""

    pid: int
    #: our ends of the layers' pipes, in layer order, not yet handed to _pump
    pending: list[int]

    def next_report(self) -> dict[str, object] | None:
        raise NotImplementedError

    def end(self) -> int:
        """After the last report: its wait status once it has gone."""
        _, status = os.waitpid(self.pid, 0)
        return status

    def kill(self) -> None:
        """On our error: stop it wherever it is, and reap it."""
        _kill_and_reap(self.pid)

    def close(self) -> None:
        """Our descriptors."""
        for w in self.pending:
            os.close(w)
        self.pending = []


def _data_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    with suppress(OSError):  # a smaller pipe only costs a few more context switches
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


class _OneShot(_Child):
    """A child forked now with every layer's pipe, reporting on a pipe of its own."""

    def __init__(self, root: str | os.PathLike[str], layers: int) -> None:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds = [root_fd]
        try:
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
            fds += [report_r, report_w]
            pipes = []
            for _ in range(layers):
                r, w = _data_pipe()
                fds += [r, w]
                pipes.append((r, w))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        pid = process.fork()
        if pid == 0:
            _child(root_fd, [r for r, _ in pipes], report_w)
        for fd in (root_fd, report_w, *(r for r, _ in pipes)):
            os.close(fd)
        self.pid = pid
        self.pending = [w for _, w in pipes]
        self._report_r = report_r
        self._reports = _Reports(report_r)

    def next_report(self) -> dict[str, object] | None:
        return self._reports.next()

    def close(self) -> None:
        super().close()
        os.close(self._report_r)


class _QueuedSession(_Child):
    """The spare session child, given every layer's ``apply`` command at once (the
    root and the layer's pipe each): it works through them in order, reporting
    each on its socket, and exits when we close that.  A socket pair's buffer
    holds MAX_LAYERS_PER_CHILD commands and as many reports with room to spare
    (~270 commands or ~160 reports of 300 bytes before a send would block), so
    neither side waits for the other to read."""

    def __init__(self, spare: tuple[int, socket.socket], root: str | os.PathLike[str],
                 layers: int) -> None:
        self.pid, self._ctl = spare
        self.pending: list[int] = []
        try:
            root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for _ in range(layers):
                    r, w = _data_pipe()
                    self.pending.append(w)
                    try:
                        socket.send_fds(self._ctl, [b"apply"], [root_fd, r])
                    finally:
                        os.close(r)
            finally:
                os.close(root_fd)
        except BaseException:
            self.kill()
            self.close()
            raise

    def next_report(self) -> dict[str, object] | None:
        return _recv_report(self._ctl)

    def end(self) -> int:
        # Out of the root first (one round trip), then told to exit (EOF): its exit,
        # the kernel tearing down its copy of our memory (~3 ms), is nobody's wait.
        if not _park(self._ctl):
            self._ctl.close()
            return super().end()  # gone or confused: its wait status says which
        self._ctl.close()
        reap_later(self.pid)
        return 0

    def close(self) -> None:
        super().close()
        self._ctl.close()


def _recv_report(ctl: socket.socket) -> dict[str, object] | None:
    """A session child's next report; None if it sent none (gone, or a child killed
    with commands still queued: the read then fails with ECONNRESET)."""
    try:
        data = ctl.recv(_CTL_MESSAGE)
        report = jsonutil.loads(data) if data else None
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _kill_and_reap(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with suppress(ChildProcessError):
        os.waitpid(pid, 0)


# -- one child for layers applied onto different roots in turn ------------------------------

_CTL_MESSAGE = 64 * 1024  # largest control message: a report


def _session_child(ctl: socket.socket, parent_end: socket.socket) -> None:
    """Never returns: applies layers on command until the parent hangs up, then ``_exit``s.

    Commands (one datagram each, descriptors attached): ``apply`` with the root
    directory and the layer's pipe: chroot into that root, apply, report;
    ``park`` with the host's root directory: chroot there, so that the parent
    can unmount the last root.  While a layer is applied the child holds no
    descriptor of a directory outside its root, as the one-shot child does.
    Any failure is reported, then the child exits.
    """
    code = 1
    try:  # whatever happens below, this process ends here: it never returns to its caller
        report: dict[str, object] | None = None
        try:
            parent_end.close()
            detach_from_parent({ctl.fileno()})
            os.umask(0)
            while True:
                msg, fds, _flags, _addr = socket.recv_fds(ctl, 64, 2)
                if not msg:  # the parent closed the session
                    code = 0
                    break
                if msg == b"apply" and len(fds) == 2:
                    root_fd, data_fd = fds
                    enter_root(root_fd)
                    ctl.send(json.dumps({"ok": True, "counts": _apply_one(data_fd)}).encode())
                elif msg == b"park" and len(fds) == 1:
                    enter_root(fds[0])
                    ctl.send(b'{"ok": true, "parked": true}')
                else:
                    raise UnpackError(f"the layer applier got a bad command ({msg[:20]!r}, {len(fds)} fds)")
        except BaseException as e:
            report = _failure(e)
        if report is not None:
            if isinstance(report.get("message"), str):
                report["message"] = str(report["message"])[:2000]
            # Commands queued behind the one that failed (``apply_streams`` sends all
            # its layers at once) must not be left unread: closing a socket with
            # data still queued makes the parent's next read fail with ECONNRESET
            # instead of returning this report.
            _discard_queued(ctl)
            ctl.send(json.dumps(report).encode())
    finally:
        os._exit(code)


def _discard_queued(ctl: socket.socket) -> None:
    ctl.setblocking(False)
    try:
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 64, 2)
            for fd in fds:
                os.close(fd)
            if not msg:
                return
    except OSError:  # EAGAIN: nothing more
        return
    finally:
        ctl.setblocking(True)


def _fork_session() -> tuple[int, socket.socket]:
    """A session child, and our end of its socket."""
    reap_exited()  # earlier ones told to exit (reap_later), not to pile up as zombies
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = process.fork()
    except BaseException:
        parent.close()
        child.close()
        raise
    if pid == 0:
        _session_child(child, parent)
    child.close()
    return pid, parent


def _park(ctl: socket.socket) -> bool:
    """Move an idle session child out of the root it applied to, to the host's root
    (the caller may unmount the root then); whether it says it did."""
    try:
        host_root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            socket.send_fds(ctl, [b"park"], [host_root])
        finally:
            os.close(host_root)
    except OSError:
        return False
    parked = _recv_report(ctl)
    return parked is not None and parked.get("parked") is True


# A session child forked ahead: the next apply of this process takes it.
_spare: tuple[int, socket.socket] | None = None
_spare_lock = threading.Lock()  # applies may start from several threads at once


def fork_spare_session() -> None:
    """Fork a session child now for this process's next apply, which then forks none.

    ``ember agent``'s waiting runner calls this before it pre-faults its memory:
    the child shares the agent's pages, not the runner's fresh copies, so the
    runner's writes during the apply copy nothing (a fork at apply time makes
    each page the parent writes afterwards a copy-on-write fault: ~1,800 of them
    in a pull + unpack of a 1 MB image).  Unused, it exits with this process.
    """
    global _spare
    with _spare_lock:
        if _spare is None:
            _spare = _fork_session()


def _take_spare() -> tuple[int, socket.socket] | None:
    """The spare session child, if there is one and it is alive (taken: the next caller forks)."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is None:
        return None
    pid, ctl = spare
    try:
        gone = os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        gone = True
    if gone:
        ctl.close()
        return None
    return spare


def dismiss_spare() -> int | None:
    """Tell an unused spare session child to exit (it reads EOF); its pid, for the
    caller to reap (else it outlives us as a zombie where init does not reap)."""
    spare = _take_spare()
    if spare is None:
        return None
    pid, ctl = spare
    ctl.close()
    return pid


class ApplierSession:
    """One chroot-ed applier child that applies layers onto one root after another.

    For a chain of snapshots (one root per layer, each mounted in turn): it
    saves a fork, the child's set-up and its exit per layer.  Between layers the
    child is parked at the host's root, so the caller can unmount the root it
    left.  After any failure the child is gone; the next ``apply`` starts a new one.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._ctl: socket.socket | None = None
        self._view: memoryview | None = None

    def __enter__(self) -> ApplierSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> socket.socket:
        self._pid, self._ctl = _take_spare() or _fork_session()
        return self._ctl

    def _recv(self) -> dict[str, object] | None:
        assert self._ctl is not None
        return _recv_report(self._ctl)

    def _stop(self, *, kill: bool) -> int:
        """End the child (it may be in the middle of a root); its wait status."""
        pid, ctl = self._pid, self._ctl
        self._pid, self._ctl = -1, None
        if ctl is not None:
            ctl.close()  # an idle child reads EOF and exits
        if pid < 0:
            return 0
        if kill:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        return status

    def close(self) -> None:
        """The child, if any, is parked at the host's root (every ``apply`` that returned
        left it there; one that raised stopped it): told to exit, it is reaped off our
        path (``reap_later``)."""
        pid, ctl = self._pid, self._ctl
        self._pid, self._ctl = -1, None
        if ctl is not None:
            ctl.close()
        if pid >= 0:
            reap_later(pid)

    def apply(self, root: str | os.PathLike[str], layer: LayerStream,
              check: Callable[[], None]) -> tuple[dict[str, int], int]:
        """Apply one layer onto ``root``; ``check()`` runs once it is streamed and applied
        (it raises to refuse it).  Returns the child's counters and the bytes streamed.
        When this returns or raises, no child of ours is inside ``root`` any more."""
        ctl = self._ctl or self._start()
        if self._view is None:
            self._view = memoryview(bytearray(CHUNK))
        try:
            root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                data_r, data_w = os.pipe2(os.O_CLOEXEC)
            except BaseException:
                os.close(root_fd)
                raise
            with suppress(OSError):
                fcntl.fcntl(data_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            try:
                socket.send_fds(ctl, [b"apply"], [root_fd, data_r])
            except BaseException:
                os.close(data_w)
                raise
            finally:
                os.close(root_fd)
                os.close(data_r)
            total, source_error, cut = _pump(layer, data_w, self._view)
            report: dict[str, object] | None = None
            try:
                report = self._recv()
            except BaseException:
                if cut is not None:
                    cut.__exit__(None, None, None)
                raise
            if cut is not None and _applied(report):
                # it left the bytes after the archive to us (as apply_streams)
                more, source_error = _hash_rest(layer, cut, self._view)  # closes it
                total += more
            elif cut is not None:
                better = _blamed(report, cut)  # closes it
                if better is not None:
                    raise better
            if source_error is not None:
                # ember's own errors (a blob's download that failed or was cancelled while
                # it was applied as it arrived) say what happened already
                if isinstance(source_error, EmberError):
                    raise source_error
                raise InvalidLayer(f"cannot read {layer.describe}: {source_error}") from None
            if report is None:
                status = self._stop(kill=False)
                raise UnpackError(
                    f"the layer applier for {layer.describe} {_describe_status(status)} without a report"
                )
            if not report.get("ok"):
                cls = InvalidLayer if report.get("kind") == "invalid" else UnpackError
                raise cls(f"{layer.describe}: {report.get('message')}")
            counts = report.get("counts")
            if not isinstance(counts, dict):
                raise UnpackError(f"the layer applier for {layer.describe} sent a malformed report")
            check()
            if not _park(ctl):
                raise UnpackError("the layer applier did not leave the root it applied")
            return {str(k): int(v) for k, v in counts.items()}, total
        except BaseException:
            self._stop(kill=True)  # wherever it is, it is gone now
            raise
