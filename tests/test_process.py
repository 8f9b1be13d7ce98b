"""What ember reads of other processes in /proc (ember.process), on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ember.process import (
    boot_id,
    parse_proc_stat,
    pid_alive,
    proc_start_time,
    proc_stat,
    wait_pid_exit,
)


def test_stat_fields_come_after_the_last_parenthesis_of_the_command_name() -> None:
    """A command name may hold spaces and ')': fields counted from the left were wrong."""
    rest = " ".join(str(n) for n in range(4, 22))
    stat = parse_proc_stat(f"42 (a) b (c)) S {rest} 987654 23 24\n".encode())
    assert (stat.state, stat.start_time) == (b"S", 987654)
    for bad in (b"", b"42 (cut", b"42 (short) S 1 2"):
        with pytest.raises(ValueError):
            parse_proc_stat(bad)


def test_a_process_is_named_by_its_pid_and_start_time() -> None:
    me = proc_stat(os.getpid())
    assert not me.ended and me.start_time == proc_start_time(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = proc_start_time(child.pid)
        assert start is not None and start >= me.start_time
        assert pid_alive(child.pid)
    finally:
        child.kill()
    # killed, not reaped yet: a zombie, which is not alive
    deadline = time.monotonic() + 10
    while not proc_stat(child.pid).ended:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid) and proc_start_time(child.pid) is None
    with pytest.raises(FileNotFoundError):
        proc_stat(child.pid)


def test_waiting_for_a_process_that_is_not_a_child() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not wait_pid_exit(sleeper.pid, 0.05)
    finally:
        sleeper.kill()
    assert wait_pid_exit(sleeper.pid, 10)  # a zombie has exited
    sleeper.wait()
    assert wait_pid_exit(sleeper.pid, 0)  # and a pid that is gone


def test_boot_id_is_this_boots() -> None:
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert boot_id() == f.read().strip()
