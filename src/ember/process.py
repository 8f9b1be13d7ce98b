"""Small process-level helpers shared by the parts that fork, and what ember reads of
other processes in ``/proc`` (whether one is alive, which one a pid names)."""

from __future__ import annotations

import atexit
import ctypes
import errno
import functools
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

_PR_SET_PDEATHSIG = 1
# Loaded once, at import: after a fork (a preexec function, a forked relay) loading a
# library could take the dynamic loader's lock that another thread held at the fork.
_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int, signum: int = signal.SIGKILL) -> None:
    """In a child: ``signum`` when the thread that forked it ends, and exit at once if
    ``parent`` (the forking process) has ended already (between fork and this call the
    signal could not yet be asked for)."""
    parent_death_signal(signum)
    if os.getppid() != parent:
        os._exit(128 + signum)


def parent_death_signal(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when the thread that forked it
    ends (0: no longer).  Linux ties this to the *thread*, and resets it on exec of a
    set-user-ID program only."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


#: the signals ember turns into exceptions (SIGINT: KeyboardInterrupt; SIGTERM and
#: SIGHUP: the CLI's handler raises)
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


_Handler = Callable[[int, FrameType | None], object]


class HeldInterrupts:
    """The interrupts that came while ``interrupts_held`` held them, and the handlers
    they were held from."""

    def __init__(self) -> None:
        self.came: list[tuple[int, FrameType | None]] = []
        self.saved: dict[int, _Handler] = {}

    def deliver(self) -> None:
        """Run the handler of the first one that came (KeyboardInterrupt, or what the
        CLI made it raise), now that it is restored."""
        if self.came:
            first, frame = self.came[0]
            self.saved[first](first, frame)


@contextmanager
def interrupts_held() -> Iterator[HeldInterrupts]:
    """While inside, a SIGINT, SIGTERM or SIGHUP with a Python handler is only recorded;
    the handlers are restored on the way out, and ``deliver`` runs the first one's.

    Only signals with a Python handler are held: one at its default disposition still
    ends the process at once.  Python runs signal handlers in the main thread only,
    so elsewhere there is nothing to hold (and nothing is recorded).
    """
    held = HeldInterrupts()
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    try:
        for signum in INTERRUPTS:
            handler = signal.getsignal(signum)
            if callable(handler):
                held.saved[signum] = handler  # before replacing it: always restored below
                signal.signal(signum, lambda got, frame: held.came.append((got, frame)))
        yield held
    finally:
        for held_signum, handler in held.saved.items():
            signal.signal(held_signum, handler)


def fork() -> int:
    """``os.fork()``, with a SIGINT, SIGTERM or SIGHUP that comes meanwhile acted on once
    it has returned to the parent.

    Python runs ``register_at_fork`` callbacks (logging's lock release, among
    others) around the fork, and a signal handler that raises inside one of them
    raises into a place that reports the exception as "ignored" and goes on: a
    Ctrl-C or a hang-up was lost, the command ran on.  Blocking the signals in
    this thread is not enough: another thread of the process takes them then, and
    Python still runs the handler here, in the main thread.  So the handlers are
    held over the fork (``interrupts_held``), and the parent then runs the first
    one that came (which raises from here, as it could a moment later anyway).
    The child starts with the handlers it had, and none of the parent's signals.
    """
    with interrupts_held() as held:
        pid = os.fork()
    if pid != 0:
        held.deliver()
    return pid


_MADV_POPULATE_WRITE = 23  # Linux 5.14
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_LIBC.madvise.restype = ctypes.c_int


def populate_for_writing(start: int, length: int) -> bool:
    """Fault in ``length`` bytes of this process's memory at ``start`` as writes would:
    a page shared copy-on-write with the parent gets its private copy now rather
    than at its first write.  False where the kernel declines (before Linux 5.14,
    or a range that cannot be written); the pages then fault later, as they would
    have anyway."""
    return _LIBC.madvise(start, length, _MADV_POPULATE_WRITE) == 0


# ---- other processes, through /proc ---------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """What ember reads of ``/proc/PID/stat``."""

    #: field 3: R, S, D, Z (zombie), X (dead), ...
    state: bytes
    #: field 22, clock ticks after the boot: with the pid it names one process, as a pid
    #: alone does not once the pid is reused
    start_time: int
    #: field 4: the parent's pid
    ppid: int = 0
    #: fields 14 and 15, utime + stime: the CPU time it used, in clock ticks
    cpu_ticks: int = 0

    @property
    def ended(self) -> bool:
        """The process has exited (a zombie waits only for its parent to read its status)."""
        return self.state in (b"Z", b"X", b"x")


def parse_proc_stat(data: bytes) -> ProcStat:
    """``/proc/PID/stat``'s fields; ValueError when ``data`` is not such a line.  The
    command name (field 2) may hold spaces and parentheses: the fields after it start
    after its last ')'."""
    try:
        rest = data[data.rindex(b")") + 2 :].split()
        # fields 3, 22, 4, 14 + 15
        return ProcStat(rest[0], int(rest[19]), int(rest[1]), int(rest[11]) + int(rest[12]))
    except IndexError:
        raise ValueError("not a /proc/PID/stat line") from None


def proc_stat(pid: int) -> ProcStat:
    """Process ``pid``'s ``ProcStat``; FileNotFoundError (or ProcessLookupError) when
    there is no such process, another OSError when it cannot be read (hidepid),
    ValueError when what was read is not a stat line."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return parse_proc_stat(f.read())


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` now (its children, theirs, ...), from /proc; those that
    left it (a daemon that detached, reparented to init) are not found."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            children.setdefault(proc_stat(int(entry.name)).ppid, []).append(int(entry.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def proc_start_time(pid: int) -> int | None:
    """``ProcStat.start_time`` of ``pid``; None when there is no such process or it
    cannot be read."""
    try:
        return proc_stat(pid).start_time
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (a number no process can have)
        return False
    except PermissionError:
        return True  # another user's
    try:
        return not proc_stat(pid).ended
    except (OSError, ValueError):
        return False


def wait_pid_exit(pid: int, timeout: float | None) -> bool:
    """Wait for a process that is not our child to exit (pidfd); True once it has."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError as e:
        if e.errno == errno.ESRCH:
            return True
        raise
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready) or not pid_alive(pid)
    finally:
        os.close(fd)


@functools.cache
def boot_id() -> str | None:
    """This boot's random id (``/proc/sys/kernel/random/boot_id``): a pid and start time
    name one process of one boot only.  None when it cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


# -- children told to exit, reaped off the caller's path -----------------------------------

#: children told to exit (``reap_later``) and not reaped yet
_exiting: list[int] = []
_exiting_lock = threading.Lock()


def reap_later(pid: int) -> None:
    """Reap ``pid``, a child told to exit that holds nothing of ours any more, later:
    the kernel's teardown of a forked copy of our address space takes ~3 ms, which no
    caller needs to wait for.  Reaped without waiting by ``reap_exited`` (this and
    the applier's next fork call it), waited for by ``reap_exiting``, which also runs
    at exit: where init does not reap, an orphan would stay a zombie.  No thread: one
    started here waited up to a GIL switch interval before it first ran."""
    with _exiting_lock:
        if not _exiting:
            atexit.unregister(reap_exiting)  # registered once, however often this empties
            atexit.register(reap_exiting)
        _exiting.append(pid)
    reap_exited()


def reap_exited() -> None:
    """Reap those of ``reap_later``'s children that have exited; never waits."""
    _reap(block=False)


def reap_exiting() -> None:
    """Wait until every child given to ``reap_later`` has been reaped."""
    _reap(block=True)


def _reap(*, block: bool) -> None:
    with _exiting_lock:
        for pid in list(_exiting):
            try:
                done = os.waitpid(pid, 0 if block else os.WNOHANG)[0] != 0
            except ChildProcessError:  # reaped by someone else (SIGCHLD ignored, say)
                done = True
            if done:
                _exiting.remove(pid)
