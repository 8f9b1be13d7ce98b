"""The monitor's side of the guest's output: FIFOs the VMM writes, capped logs it fills.

The VMM never writes a log file itself: each stream it produces (program stdout
and stderr, serial console, exit report, its own stderr) goes into a FIFO in the
machine's directory, and the monitor copies it into the log (``RotatingLog``; the
exit report and the VMM's stderr into a ``CappedFile``).  A slow monitor is back-pressure, not loss: when a
FIFO is full the VMM stops taking the guest's output until it drains.

The monitor opens each FIFO read-write, so it is never at end-of-file while the
VMM has not opened it yet or has closed it: the VMM's exit (its pidfd) is what
ends the copying, after one last non-blocking drain of every FIFO.

When a log cannot rotate because the attached reader (the foreground ``ember
run``) has not opened the file the rotation would drop, the monitor keeps the
stream's bytes in memory (retried every ``RETRY_S``), up to ``HOLD_LIMIT``;
past that it stops reading that FIFO and the guest waits.  Keeping the guest
waiting is the last resort, not the first: what the guest's kernel has queued
for a port the host does not take is lost when the guest powers off (seen
here: megabytes of a fast printer's last output), so a reader that is merely a
little slow must not cause it.  Once the VMM has exited, the monitor waits for
the reader while it makes progress, and at most ``DRAIN_WAIT_S`` for one that
has stalled (say a suspended ``ember run``) before rotating anyway; and (bounded
the same way) until it has opened the current file, so that deleting the logs
(``--rm``) cannot cut it off from the files before.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import stat
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ember.machines.logs import CappedFile, LogConfig, RotatingLog
from ember.machines.report import MAX_REPORT, parse_report
from ember.vm.vmm.base import Channels

#: the exit report is one short JSON line: keep no more than this of the status port
STATUS_LIMIT = 1 << 16
#: the VMM's own stderr (QEMU's warnings and errors, some of which a guest can provoke):
#: its first MiB is kept, the rest dropped
VMM_LOG_LIMIT = 1 << 20
_READ = 1 << 16
#: how often a stream held back by the attached reader is retried
RETRY_S = 0.01
#: bytes of one stream kept in memory while the attached reader catches up
HOLD_LIMIT = 4 << 20
#: the same after the exit report: room for what QEMU and the FIFO still hold (~2 MiB),
#: and no more (a guest can write a report-like line to the status port at any time)
FINAL_HOLD_LIMIT = HOLD_LIMIT + (4 << 20)
#: FIFO capacity asked for (Linux's default is 64 KiB; 1 MiB is pipe-max-size's default)
PIPE_SIZE = 1 << 20
#: after the VMM's exit, how long a stalled attached reader is waited for
DRAIN_WAIT_S = 10.0
#: after the exit report, how long every FIFO must stay quiet before the guest is told
#: it may power off (QEMU hands over what it held back as soon as a FIFO has room)
QUIET_S = 0.03


class Sink(Protocol):
    def write(self, data: bytes | bytearray, *, force: bool = False) -> int: ...

    def close(self) -> None: ...

    def files_behind(self) -> int: ...


@dataclass
class _Stream:
    fifo: Path
    fd: int
    sink: Sink
    failed: bool = False
    #: bytes read from the FIFO that the log could not take yet (reader behind)
    pending: bytearray = field(default_factory=bytearray)
    #: bytes read from the FIFO so far
    received: int = 0


def fifo_channels(d: Path) -> Channels:
    """Where the VMM writes: one FIFO per stream (the control socket is unchanged)."""
    logs = Channels.in_dir(d)
    return Channels(
        console_log=d / "console.fifo",
        stdout_log=d / "stdout.fifo",
        stderr_log=d / "stderr.fifo",
        status_file=d / "status.fifo",
        control_socket=logs.control_socket,
        exec_sockets=logs.exec_sockets,
    )


def vmm_fifo(d: Path) -> Path:
    """Where the VMM's own stdout and stderr go (the monitor copies it into ``vmm.log``)."""
    return d / "vmm.fifo"


#: what ember-init writes on the console once it has taken a restored template's run
#: config (after its "ok", before anything of the program's): from then on the program
#: may run, whatever became of the "ok" (without its line's end: \r\n on a console tty)
RESTORE_TAKEN = b"ember-init: run config taken"


class StreamPump:
    """The FIFOs of one machine and the logs they feed."""

    def __init__(self, streams: list[_Stream], channels: Channels) -> None:
        self.streams = streams
        self.channels = channels
        self._by_fd = {s.fd: s for s in streams}
        #: the guest's exit report came: from then on the FIFOs are read up to
        #: FINAL_HOLD_LIMIT (what the VMM still holds would die with the VM)
        self.report_seen = False
        #: the status port's first bytes (the exit report), and what the report says the
        #: program's stdout and stderr ports sent (None: it does not say)
        self._status = bytearray()
        self.owed: tuple[int, int] | None = None
        #: a restored guest is handed its config: the console is looked at for
        #: ``RESTORE_TAKEN`` until it comes (a booted machine's console never is)
        self.watch_restore = False
        #: the console said ``RESTORE_TAKEN`` (and the end of what it said, for a marker
        #: split across two reads)
        self._config_taken = False
        self._console_tail = b""

    def _hold_limit(self) -> int:
        return FINAL_HOLD_LIMIT if self.report_seen else HOLD_LIMIT

    @classmethod
    def create(cls, d: Path, config: LogConfig) -> StreamPump:
        """Make the FIFOs and open them (before the VMM starts: it opens them by name)."""
        logs, fifos = Channels.in_dir(d), fifo_channels(d)
        pairs: list[tuple[Path, Callable[[], Sink]]] = [
            (fifos.stdout_log, lambda: RotatingLog(logs.stdout_log, config)),
            (fifos.stderr_log, lambda: RotatingLog(logs.stderr_log, config)),
            (fifos.console_log, lambda: RotatingLog(logs.console_log, config)),
            (fifos.status_file, lambda: CappedFile(logs.status_file, STATUS_LIMIT)),
            (vmm_fifo(d), lambda: CappedFile(d / "vmm.log", VMM_LOG_LIMIT)),
        ]
        streams: list[_Stream] = []
        try:
            for fifo, make_sink in pairs:
                fd = _open_fifo(fifo)
                try:
                    sink = make_sink()
                except BaseException:
                    os.close(fd)
                    raise
                streams.append(_Stream(fifo, fd, sink))
        except BaseException:
            cls(streams, fifos).close()
            for fifo, _ in pairs:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(fifo)
            raise
        return cls(streams, fifos)

    def fds(self) -> list[int]:
        return list(self._by_fd)

    def pump(self, fd: int, limit: int = 16) -> int:
        """Copy what is waiting in one FIFO (at most ``limit`` reads, to stay fair)."""
        s = self._by_fd[fd]
        moved = 0
        for _ in range(limit):
            if len(s.pending) >= self._hold_limit():
                break  # the FIFO fills and the VMM stops taking the guest's output
            try:
                data = os.read(fd, _READ)
            except BlockingIOError:
                break
            if not data:
                break
            moved += len(data)
            s.received += len(data)
            if s.fifo == self.channels.status_file and not self.report_seen:
                self._status += data[: MAX_REPORT - len(self._status)]
                if b"\n" in data:
                    self.report_seen = True
                    report = parse_report(bytes(self._status))
                    self.owed = report.sent if report is not None else None
            if self.watch_restore and s.fifo == self.channels.console_log and not self._config_taken:
                seen = self._console_tail + data
                self._config_taken = RESTORE_TAKEN in seen
                self._console_tail = seen[-(len(RESTORE_TAKEN) - 1) :]
            if s.pending:
                s.pending += data  # behind what is held back already
                self._deliver(s)
            else:
                self._deliver(s, data)
        return moved

    def all_received(self) -> bool:
        """Whether the program's stdout and stderr, as much as the exit report says the
        guest sent, have come out of the FIFOs."""
        if self.owed is None:
            return False
        got = {s.fifo: s.received for s in self.streams}
        return (
            got.get(self.channels.stdout_log, 0) >= self.owed[0]
            and got.get(self.channels.stderr_log, 0) >= self.owed[1]
        )

    def received(self, fifo: Path) -> int:
        """Bytes read so far from one of the FIFOs (what this run of the machine wrote)."""
        return sum(s.received for s in self.streams if s.fifo == fifo)

    def program_spoke(self) -> bool:
        """Whether the guest wrote on the program's stdout or stderr port or sent its
        exit report: a sign that ember-init took its run config.  The console does not
        count: a restored kernel that hangs may still print warnings there."""
        ports = (self.channels.stdout_log, self.channels.stderr_log, self.channels.status_file)
        for s in self.streams:
            if s.fifo not in ports:
                continue
            waiting = array.array("i", [0])
            with contextlib.suppress(OSError):
                fcntl.ioctl(s.fd, termios.FIONREAD, waiting)
            if waiting[0] > 0 or s.received > 0:
                return True
        return False

    def config_taken(self) -> bool:
        """Whether ember-init said on the console that it took a restored template's run
        config (``RESTORE_TAKEN``), reading what waits in the console's FIFO first.  Only
        ember-init writes there before it has taken the config, so unlike the rest of the
        console this is no restored kernel's noise."""
        for s in self.streams:
            if s.fifo == self.channels.console_log:
                while not self._config_taken and self.pump(s.fd):
                    pass
        return self._config_taken

    def retry(self, force: bool = False) -> bool:
        """Offer held-back bytes again; True when none are left anywhere."""
        for s in self.streams:
            if s.pending:
                self._deliver(s, force=force)
        return not any(s.pending for s in self.streams)

    def drain(self, wait: float = DRAIN_WAIT_S) -> None:
        """Everything left in every FIFO (the VMM has exited: nothing more comes).

        An attached reader that is behind is waited for while it makes progress: the
        monitor rotates anyway (dropping what that reader has not read) only once it
        has moved on by no file for ``wait`` seconds (a suspended ``ember run``), not
        ``wait`` after the VMM's exit (a reader that keeps reading a long backlog
        through small files needs longer and must get all of it).  Then, as long as
        the same holds, until that reader has opened the current file of every log:
        what follows may delete them (``--rm``)."""
        deadline = time.monotonic() + wait
        held_before = self._held_bytes()
        force = False
        while True:
            # once given up on, a stalled reader is not waited for again
            force = force or time.monotonic() >= deadline
            self.retry(force=force)
            moved = 0
            for fd in self._by_fd:
                moved += self.pump(fd)
            held = self._held_bytes()
            if moved or held < held_before:
                deadline = time.monotonic() + wait  # the FIFOs or the reader moved on
            held_before = held
            if not moved and not held:
                break
            if not moved:
                time.sleep(RETRY_S)  # an attached reader is catching up
        behind_before = None
        while not force:
            behind = sum(s.sink.files_behind() for s in self.streams)
            if not behind:
                return
            if behind_before is not None and behind < behind_before:
                deadline = time.monotonic() + wait
            behind_before = behind
            if time.monotonic() >= deadline:
                print(
                    "monitor: the attached reader did not catch up with the logs: letting them go",
                    file=sys.stderr,
                )
                return
            time.sleep(RETRY_S)

    def _held_bytes(self) -> int:
        return sum(len(s.pending) for s in self.streams)

    def _deliver(self, s: _Stream, data: bytes | None = None, force: bool = False) -> None:
        """Write ``data`` (or the held-back bytes) to the stream's log; keep what it refuses."""
        try:
            n = s.sink.write(s.pending if data is None else data, force=force)
        except OSError as e:
            # a full disk must not take the machine down: the output is dropped
            if not s.failed:
                print(f"monitor: cannot write {s.fifo.stem} log: {e}", file=sys.stderr)
                s.failed = True
            s.pending.clear()
            return
        if data is None:
            del s.pending[:n]
        elif n < len(data):
            s.pending += data[n:]

    def run_until_exit(
        self,
        pid_fd: int,
        drain_wait: float = DRAIN_WAIT_S,
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        """Copy output until ``pid_fd`` (the VMM's pidfd) says it exited; then drain.

        ``on_drained`` is called once, when the guest's exit report has come and the
        program's output it counts (``sent``) has all been read from the FIFOs, or,
        for a guest that does not count, when every FIFO has then been quiet for
        ``QUIET_S``: the monitor then lets the guest power off (ember-init waits for
        that, see the run config's ``exit_ack``)."""
        poller = select.poll()
        watched: dict[int, bool] = {}
        poller.register(pid_fd, select.POLLIN)
        exited = False
        last_moved = time.monotonic()
        while not exited:
            for s in self.streams:  # a stream held back to its limit: its FIFO is not read
                want = len(s.pending) < self._hold_limit()
                if watched.get(s.fd) != want:
                    poller.register(s.fd, select.POLLIN if want else 0)
                    watched[s.fd] = want
            held = any(s.pending for s in self.streams)
            waiting = self.report_seen and on_drained is not None
            timeout = RETRY_S * 1000 if held or waiting else None
            for fd, _ev in poller.poll(timeout):
                if fd == pid_fd:
                    exited = True
                elif self.pump(fd):
                    last_moved = time.monotonic()
            if held:
                self.retry()
            if waiting and (
                self.all_received()
                if self.owed is not None
                else time.monotonic() - last_moved >= QUIET_S
            ):
                assert on_drained is not None
                on_drained()
                on_drained = None
        self.drain(drain_wait)

    def close(self) -> None:
        """Close the FIFOs and logs, and remove the FIFOs."""
        for s in self.streams:
            with contextlib.suppress(OSError):
                os.close(s.fd)
            with contextlib.suppress(OSError):
                s.sink.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s.fifo)
        self.streams, self._by_fd = [], {}


def _open_fifo(path: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale one from a crashed monitor
    os.mkfifo(path, 0o600)
    # read-write: never EOF while the VMM has not opened it yet, and the VMM's
    # open(O_WRONLY) does not block; non-blocking: the poll loop reads what is there
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a FIFO")
    # room for a moment's delay of the monitor before QEMU has to hold the guest back
    # (pages are taken as they fill; past the per-user pipe quota the default stays)
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return fd
