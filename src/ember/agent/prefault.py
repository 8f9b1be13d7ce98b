"""Taking a forked runner's copy-on-write faults before its command arrives.

A runner is a fork of the agent: it shares every page of the agent's ~40 MB
heap, and the first write to each one (Python writes reference counts on every
object it touches) stops the command for a page fault and a copy, some 3,000
of them in a pull.  A runner forked ahead of its command takes those faults
while it waits (``MADV_POPULATE_WRITE``, in slices, giving up as soon as the
command arrives), so that the command finds its memory its own.

Not at once (DELAY): the runner is forked as the previous command starts, and
copying beside that command slowed it more than it saved, even at idle
priority.  The price is memory: an idle runner holds a private copy of the
agent's heap (~36 MB) instead of sharing it.  What it saves: docs/agent.md.
"""

from __future__ import annotations

from collections.abc import Callable

from ember.process import populate_for_writing

#: bytes populated between two looks at whether the command has arrived
SLICE = 2 << 20
#: seconds a new runner waits before pre-faulting: commands that follow one
#: another closer than this take a runner that has not (as before it existed)
DELAY = 0.25


def may_leave_idle(euid: int, rlimit_nice: int, nice: int) -> bool:
    """Whether a process may switch from SCHED_IDLE back to SCHED_OTHER (sched(7)):
    root may; anyone else only if RLIMIT_NICE allows its nice value (the limit
    is 20 - nice: with the usual limit of 0, nobody but root comes back)."""
    if euid == 0:
        return True
    return rlimit_nice == -1 or rlimit_nice >= 20 - nice  # -1: RLIM_INFINITY


def writable_private_ranges(maps: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` address ranges of the private writable mappings listed in
    ``maps`` (the text of ``/proc/self/maps``): heap, anonymous memory, libraries'
    data.  Shared mappings are left out (writing them copies nothing), as are the
    kernel's own (``[vvar]``, ``[vsyscall]``)."""
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or len(fields[1]) != 4:
            continue
        perms = fields[1]
        if perms[0] != "r" or perms[1] != "w" or perms[3] != "p":
            continue
        name = fields[5].strip() if len(fields) > 5 else ""
        if name.startswith("[v"):
            continue
        start, _, end = fields[0].partition("-")
        try:
            lo, hi = int(start, 16), int(end, 16)
        except ValueError:
            continue
        if hi > lo:
            ranges.append((lo, hi))
    return ranges


def slices(ranges: list[tuple[int, int]], size: int = SLICE) -> list[tuple[int, int]]:
    """``ranges`` cut into ``(start, length)`` pieces of at most ``size`` bytes."""
    out = []
    for lo, hi in ranges:
        for start in range(lo, hi, size):
            out.append((start, min(size, hi - start)))
    return out


def prefault(arrived: Callable[[], bool]) -> int:
    """Populate this process's private writable memory for writing, slice by slice,
    until done or ``arrived()``; the bytes populated."""
    with open("/proc/self/maps") as f:
        pieces = slices(writable_private_ranges(f.read()))
    done = 0
    for start, length in pieces:
        if arrived():
            break
        if populate_for_writing(start, length):
            done += length
    return done
