"""Waiting for another process (or thread) to reach a state, read from /proc, instead of
sleeping for a guessed time: blocked on an flock, sleeping in its poll loop, a line it
printed.  Each polls with a deadline and fails the test with what it saw."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import pytest

#: how long a wait here lasts before it fails the test (the states come in milliseconds)
DEADLINE = 30.0


def poll_until(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Return once ``check()`` is true; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:g} s")
        time.sleep(0.005)


def flock_waiters(path: Path | None = None) -> list[int]:
    """The pids (as /proc/locks shows them: thread group ids) blocked on an flock of the
    file at ``path`` (its inode now), or of any file."""
    ino = None if path is None else os.stat(path).st_ino
    pids = []
    with open("/proc/locks") as f:
        for line in f:
            # "1: -> FLOCK  ADVISORY  WRITE 1234 fe:00:56789 0 EOF" for a blocked waiter
            fields = line.split()
            if len(fields) < 7 or fields[1] != "->" or fields[2] != "FLOCK":
                continue
            if ino is None or int(fields[6].rsplit(":", 1)[1]) == ino:
                pids.append(int(fields[5]))
    return pids


def wait_flock_blocked(
    path: Path | None = None, pid: int | None = None, timeout: float = DEADLINE
) -> None:
    """Return once a process (``pid``, else any) is blocked in flock on ``path`` (None:
    on any file)."""
    poll_until(
        lambda: bool(flock_waiters(path)) if pid is None else pid in flock_waiters(path),
        f"no {'process' if pid is None else pid} blocked on "
        + ("a lock" if path is None else f"the lock {path}"),
        timeout,
    )


def _pids_whose(field: int, value: int) -> list[int]:
    """The processes whose /proc stat field ``field`` (counted after the command name:
    0 state, 1 ppid, 2 pgrp, 3 session) is ``value``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...: comm may hold spaces and parentheses
        if int(stat.rsplit(")", 1)[1].split()[field]) == value:
            pids.append(int(entry))
    return pids


def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (a server started in a session of its own)."""
    return _pids_whose(3, sid)


def child_pids(ppid: int) -> list[int]:
    """The children of process ``ppid``."""
    return _pids_whose(1, ppid)


def thread_wchans(pids: Iterable[int]) -> list[str]:
    """Where each thread of ``pids`` sleeps in the kernel ("0": running)."""
    out = []
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                out.append(Path(f"/proc/{pid}/task/{tid}/wchan").read_text())
            except OSError:
                continue
    return out


def in_nanosleep(pid: int) -> bool:
    """``pid`` sleeps in nanosleep (``time.sleep``)."""
    try:
        return "nanosleep" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


def read_syscalls(pid: int) -> int:
    """``pid``'s read system calls so far (/proc/PID/io syscr)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError(f"no syscr in /proc/{pid}/io")


def wait_poll_round(pid: int, timeout: float = DEADLINE) -> None:
    """Return once ``pid``, a loop that reads files and then sleeps (``time.sleep``),
    has gone through one whole round that began after this call: it slept, read
    again, and is back in its sleep."""
    start = read_syscalls(pid)
    seen = [start]

    def round_done() -> bool:
        # a read after the call, then asleep, then a read after that, then asleep again:
        # the second round of reads began after the call (the first may have been under way)
        now = read_syscalls(pid)
        if now != seen[-1] and in_nanosleep(pid) and read_syscalls(pid) == now:
            seen.append(now)
        return len(seen) >= 3

    poll_until(round_done, f"process {pid} did not go round its loop again", timeout)


def read_line(stream: IO[Any], timeout: float = DEADLINE) -> str:
    """The next line of a child's pipe, read byte by byte from its descriptor (nothing
    is left in the file object's buffer, so ``communicate()`` gets the rest); fails the
    test if it does not come within ``timeout``."""
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"no whole line within {timeout:g} s (got {data!r})")
        byte = os.read(fd, 1)
        if not byte:
            pytest.fail(f"the pipe ended before a whole line (got {data!r})")
        data += byte
    return data.decode()
