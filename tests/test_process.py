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
    reap_exited,
    reap_exiting,
    reap_later,
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


def _fork_exiting(after: float) -> int:
    """A child that exits ``after`` seconds from now."""
    pid = os.fork()
    if pid == 0:
        time.sleep(after)
        os._exit(0)
    return pid


def _state(pid: int) -> bytes | None:
    try:
        return proc_stat(pid).state
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def test_a_child_reaped_later_is_reaped_without_waiting_then_waited_for() -> None:
    slow, quick = _fork_exiting(2.0), _fork_exiting(0.0)
    while _state(quick) not in (b"Z", None):  # exited: a zombie until reaped
        time.sleep(0.01)
    reap_later(slow)  # still running: not waited for (else it would be gone below)
    reap_later(quick)  # exited already: reaped right here
    assert _state(quick) is None and _state(slow) not in (b"Z", None)
    reap_exited()  # never waits either
    assert _state(slow) not in (b"Z", None)
    reap_exiting()  # waits for it
    assert _state(slow) is None
    reap_exiting()  # nothing left: returns at once


def test_a_child_someone_else_reaped_is_forgotten() -> None:
    pid = _fork_exiting(0.0)
    os.waitpid(pid, 0)
    reap_later(pid)
    reap_exiting()


_SIGNAL_IN_AN_AT_FORK_CALLBACK = """
import os, signal, sys
from ember import process

class HungUp(Exception):
    pass

def raise_hung_up(signum, frame):
    raise HungUp

signal.signal(signal.SIGHUP, raise_hung_up)
if sys.argv[2:] == ["with-a-thread"]:
    # another thread leaves the signal unblocked: the kernel may hand it that one
    import threading, time
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
# what a hang-up that comes while the parent runs logging's after-fork callback does
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGHUP))
try:
    pid = process.fork() if sys.argv[1] == "process" else os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
except HungUp:
    print("hung up")
else:
    print("went on")
"""


def test_a_signal_that_comes_during_a_fork_still_raises_in_the_parent() -> None:
    """A handler that raises inside one of Python's at-fork callbacks raises into a
    place that swallows the exception: the hang-up of an agent's runner was lost and
    its command ran on."""
    import subprocess
    import sys

    def run(*how: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _SIGNAL_IN_AN_AT_FORK_CALLBACK, *how],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip

    # the hazard is real (else this test shows nothing): a bare os.fork() loses it
    plain = run("os")
    assert plain.stdout == "went on\n" and "Exception ignored" in plain.stderr
    for how in (["process"], ["process", "with-a-thread"]):
        held = run(*how)
        assert held.stdout == "hung up\n", (how, held.stderr)
        assert "Exception ignored" not in held.stderr
