"""Which memory a spare runner pre-faults (pure), and that populating works here."""

from __future__ import annotations

import mmap
import os
import resource
import subprocess
import sys
from pathlib import Path

from ember.agent.prefault import may_leave_idle, slices, writable_private_ranges
from ember.process import populate_for_writing

MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234   /usr/bin/python3.11
55d0c0a01000-55d0c0c00000 r-xp 00001000 fd:01 1234   /usr/bin/python3.11
55d0c0e00000-55d0c0e10000 rw-p 00300000 fd:01 1234   /usr/bin/python3.11
55d0c1000000-55d0c1400000 rw-p 00000000 00:00 0      [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 ---p 00000000 00:00 0
7f0000200000-7f0000300000 rw-s 00000000 00:05 99     /dev/zero (deleted)
7f0000300000-7f0000301000 r--p 00000000 fd:01 77     /usr/lib/x86_64-linux-gnu/libc.so.6
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0      [stack]
7ffc00100000-7ffc00104000 r--p 00000000 00:00 0      [vvar]
7ffc00104000-7ffc00106000 r-xp 00000000 00:00 0      [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
not a maps line
"""


def test_only_private_writable_mappings_are_pre_faulted() -> None:
    assert writable_private_ranges(MAPS) == [
        (0x55D0C0E00000, 0x55D0C0E10000),  # the program's data
        (0x55D0C1000000, 0x55D0C1400000),  # heap
        (0x7F0000000000, 0x7F0000100000),  # anonymous memory
        (0x7FFC00000000, 0x7FFC00021000),  # stack
    ]  # not: code, guard pages (---p), shared memory (rw-s), the kernel's [vvar]


def test_slices_cover_each_range_exactly() -> None:
    pieces = slices([(0x1000, 0x1000 + 5 * 4096), (0x100000, 0x101000)], size=2 * 4096)
    assert pieces == [(0x1000, 8192), (0x3000, 8192), (0x5000, 4096), (0x100000, 4096)]


def test_populating_faults_the_pages_in_before_they_are_written() -> None:
    size = 256 * mmap.PAGESIZE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        address = _address(region)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert populate_for_writing(address, size)
        after_populate = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for offset in range(0, size, mmap.PAGESIZE):
            region[offset] = 1
        after_writes = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    finally:
        region.close()
    assert after_populate - before >= 200  # the faults were taken by madvise...
    assert after_writes - after_populate < 50  # ...not by the writes


def _address(region: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(region))


def test_kernel_declines_are_reported_not_raised() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = mmap.PAGESIZE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    address = libc.mmap(None, size, mmap.PROT_READ, flags, -1, 0)
    assert address not in (None, ctypes.c_void_p(-1).value)
    try:
        assert populate_for_writing(address, size) is False  # read-only: cannot be written
    finally:
        libc.munmap(address, size)


def test_only_who_may_come_back_idles_while_pre_faulting() -> None:
    assert may_leave_idle(0, 0, 0)  # root
    assert not may_leave_idle(1000, 0, 0)  # the usual limit: no way back from SCHED_IDLE
    assert may_leave_idle(1000, 20, 0)  # a limit that allows nice 0
    assert not may_leave_idle(1000, 19, 0)
    assert may_leave_idle(1000, 10, 10)  # an agent already at nice 10
    assert may_leave_idle(1000, -1, 0)  # unlimited


def test_the_rule_matches_this_kernel() -> None:
    """As an unprivileged user with the default limit, SCHED_IDLE is a one-way street."""
    script = (
        "import os, resource\n"
        "from ember.agent.prefault import may_leave_idle\n"
        "expect = may_leave_idle(os.geteuid(), resource.getrlimit(resource.RLIMIT_NICE)[0],"
        " os.getpriority(os.PRIO_PROCESS, 0))\n"
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "try:\n"
        "    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))\n"
        "    came_back = True\n"
        "except PermissionError:\n"
        "    came_back = False\n"
        "print(expect, came_back)\n"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    for user in ([] if os.geteuid() != 0 else [["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]]) + [[]]:
        proc = subprocess.run(
            [*user, sys.executable, "-c", script], capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": src}, timeout=30,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        expect, came_back = proc.stdout.split()
        assert expect == came_back
