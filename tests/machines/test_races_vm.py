"""A machine's host side against users and accidents that race its monitor: ``ember
stop`` while the restart policy starts the machine again, a run that is killed after an
earlier one exited, a foreground ``run --rm`` whose monitor is killed.

The monitor is a real process: a test freezes it (SIGSTOP) where the race is, rather
than hoping to hit a window of a few milliseconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest

from tests.machines.vmkit import EMBER, Ember, vm_home_fixture, wait_for
from tests.support.proc import flock_waiters, poll_until

pytestmark = [pytest.mark.vm, pytest.mark.root]

vm_home = vm_home_fixture("vmraces")

#: the first run exits 3; the ones after it say so and sleep
SECOND_SLEEPS = "echo run >> /runs; [ $(wc -l < /runs) -gt 1 ] && echo again && sleep 1000; exit 3"


def record(ember: Ember, machine_id: str) -> dict[str, Any] | None:
    """The machine's state.json as it is on disk now (None once it is gone)."""
    try:
        data: dict[str, Any] = json.loads(
            (ember.home.machines / machine_id / "state.json").read_text()
        )
    except FileNotFoundError:
        return None
    return data



def alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_stop_while_the_restart_policy_starts_the_machine_again(ember: Ember, busybox: str) -> None:
    # the first run fails at once, the next one would run for long
    res = ember(
        "run", "-d", "--name", "again", "--restart", "always", busybox, "sh", "-c", SECOND_SLEEPS
    )
    assert res.returncode == 0, res.stderr
    machine_id = res.stdout.strip()
    monitor = None
    try:
        # freeze the monitor once it has made the machine ready to run again
        # ("created") but has not started its VMM yet
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "never saw the machine between two runs"
            st = record(ember, machine_id)
            if st is None:
                continue
            monitor = st["monitor_pid"] or monitor
            if st["status"] == "created" and st["restart_count"] >= 1 and monitor:
                os.kill(monitor, signal.SIGSTOP)
                st = record(ember, machine_id)
                if st is not None and st["status"] == "created":
                    break
                os.kill(monitor, signal.SIGCONT)
        stop = subprocess.Popen(
            ["ip", "netns", "exec", ember.netns, EMBER, "stop", "again"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ember.env(),
        )  # fmt: skip
        # the stop is on its way (or has failed) before the monitor goes on: blocked on
        # the machine's lock (the frozen monitor holds it) or past it, the record marked
        lock = ember.home.machines / machine_id / "lock"
        poll_until(
            lambda: (
                stop.poll() is not None
                or stop.pid in flock_waiters(lock)  # `ip netns exec` execs ember
                or bool((record(ember, machine_id) or {}).get("stopped_by_user"))
            ),
            "the stop never reached the machine's lock or record",
            60,
        )
        os.kill(monitor, signal.SIGCONT)
        out, err = stop.communicate(timeout=60)
        assert (stop.returncode, out) == (0, "again\n"), err
        st = ember.inspect("again")
        # the run the policy was starting ended before its program did anything
        assert (st["status"], st["stopped_by_user"], st["exit_code"]) == ("exited", True, 137), st
        assert ember("logs", "again").stdout == "", "the program ran after the stop"
        count = st["restart_count"]
        # stopped by the user: not run again (the monitor, which alone restarts it, ends)
        poll_until(lambda: not alive(monitor), f"the monitor {monitor} still runs", 60)
        st = ember.inspect("again")
        assert (st["status"], st["restart_count"]) == ("exited", count)
    finally:
        if monitor is not None and alive(monitor):
            os.kill(monitor, signal.SIGCONT)
        ember("rm", "-f", "again")


def test_a_run_killed_without_a_report_does_not_take_an_earlier_runs_code(
    ember: Ember, busybox: str
) -> None:
    # the first run exits 3 (init says so on the console); the next one sleeps
    res = ember("run", "--name", "twice", busybox, "sh", "-c", SECOND_SLEEPS)
    assert res.returncode == 3, res.stderr
    try:
        assert ember("start", "twice").returncode == 0
        st = wait_for(ember, "twice", lambda s: s["status"] == "running")
        # the VMM dies without the guest telling anything (a crash, the OOM killer)
        os.kill(st["vmm_pid"], signal.SIGKILL)
        st = wait_for(ember, "twice", lambda s: s["status"] == "exited", timeout=30)
        assert (st["exit_code"], st["end_reason"]) == (137, "killed"), st
    finally:
        ember("rm", "-f", "twice")


def test_a_foreground_rm_run_whose_monitor_is_killed_still_removes_the_machine(
    ember: Ember, busybox: str
) -> None:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ember.netns, EMBER, "run", "--rm", "--name", "orphan", busybox,
         "sh", "-c", "echo up; sleep 1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ember.env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "up\n"
        st = ember.inspect("orphan")
        os.kill(st["monitor_pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 255, err
    assert "monitor disappeared" in err, err
    assert "Traceback" not in err
    assert ember("inspect", "orphan").returncode != 0, "--rm left the machine behind"
    assert not (ember.home.machines / st["id"]).exists()
