"""The monitor's side of the guest's output: FIFOs the VMM writes, capped logs it fills.

The VMM never writes a log file itself: each stream it produces (program stdout
and stderr, serial console, exit report) goes into a FIFO in the machine's
directory, and the monitor copies it into the log (``RotatingLog``; the exit
report into a ``CappedFile``).  A slow monitor is back-pressure, not loss: when a
FIFO is full the VMM stops taking the guest's output until it drains.

The monitor opens each FIFO read-write, so it is never at end-of-file while the
VMM has not opened it yet or has closed it: the VMM's exit (its pidfd) is what
ends the copying, after one last non-blocking drain of every FIFO.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ember.machines.logs import CappedFile, LogConfig, RotatingLog
from ember.vm.vmm.base import Channels

#: the exit report is one short JSON line: keep no more than this of the status port
STATUS_LIMIT = 1 << 16
_READ = 1 << 16


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Stream:
    fifo: Path
    fd: int
    sink: Sink
    failed: bool = False


def fifo_channels(d: Path) -> Channels:
    """Where the VMM writes: one FIFO per stream (the control socket is unchanged)."""
    logs = Channels.in_dir(d)
    return Channels(
        console_log=d / "console.fifo",
        stdout_log=d / "stdout.fifo",
        stderr_log=d / "stderr.fifo",
        status_file=d / "status.fifo",
        control_socket=logs.control_socket,
    )


class StreamPump:
    """The FIFOs of one machine and the logs they feed."""

    def __init__(self, streams: list[_Stream], channels: Channels) -> None:
        self.streams = streams
        self.channels = channels
        self._by_fd = {s.fd: s for s in streams}

    @classmethod
    def create(cls, d: Path, config: LogConfig) -> StreamPump:
        """Make the FIFOs and open them (before the VMM starts: it opens them by name)."""
        logs, fifos = Channels.in_dir(d), fifo_channels(d)
        pairs: list[tuple[Path, Callable[[], Sink]]] = [
            (fifos.stdout_log, lambda: RotatingLog(logs.stdout_log, config)),
            (fifos.stderr_log, lambda: RotatingLog(logs.stderr_log, config)),
            (fifos.console_log, lambda: RotatingLog(logs.console_log, config)),
            (fifos.status_file, lambda: CappedFile(logs.status_file, STATUS_LIMIT)),
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
            try:
                data = os.read(fd, _READ)
            except BlockingIOError:
                break
            if not data:
                break
            moved += len(data)
            self._deliver(s, data)
        return moved

    def drain(self) -> None:
        """Everything left in every FIFO (the VMM has exited: nothing more comes)."""
        for fd in self._by_fd:
            while self.pump(fd):
                pass

    def _deliver(self, s: _Stream, data: bytes) -> None:
        try:
            s.sink.write(data)
        except OSError as e:
            # a full disk must not take the machine down: the output is dropped
            if not s.failed:
                print(f"monitor: cannot write {s.fifo.stem} log: {e}", file=sys.stderr)
                s.failed = True

    def run_until_exit(self, pid_fd: int) -> None:
        """Copy output until ``pid_fd`` (the VMM's pidfd) says it exited; then drain."""
        poller = select.poll()
        for fd in self._by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(pid_fd, select.POLLIN)
        exited = False
        while not exited:
            for fd, _ev in poller.poll():
                if fd == pid_fd:
                    exited = True
                else:
                    self.pump(fd)
        self.drain()

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
    return fd
