"""Pieces of ``ember run`` that need no VM (the VM runs are in tests/integration)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from ember.cli.run import _await_start, _follow, _Interrupts
from ember.home import Home
from ember.machines import state as mstate
from ember.machines.errors import MachineError
from ember.machines.events import EventReader, Exited
from ember.machines.lifecycle import machine_channels
from ember.machines.logs import LogFollower
from ember.machines.state import MachineState, VMConfig
from ember.machines.store import MachineStore
from tests.machines.records import stoppable_monitor


def _machine() -> MachineState:
    return MachineState(
        id=secrets.token_hex(32), name="m1", image="oci:/x:latest",
        image_digest="sha256:" + "0" * 64, created_at=mstate.now(), command=["true"],
        config={}, vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1),
    )  # fmt: skip


def _events(*events: dict[str, Any]) -> int:
    r, w = os.pipe()
    os.write(w, b"".join(json.dumps(e).encode() + b"\n" for e in events))
    os.close(w)
    return r


def test_detached_start_returns_once_started() -> None:
    """It returns at "started" with the monitor still there (its end of the pipe open),
    and leaves what came after it to be read."""
    r, w = os.pipe()
    events = EventReader(r)
    failed: list[BaseException] = []

    def await_start() -> None:
        try:
            _await_start(_machine(), events)
        except BaseException as e:
            failed.append(e)

    try:
        os.write(w, b"".join(json.dumps(e).encode() + b"\n" for e in (
            {"event": "started", "vmm_pid": 1}, {"event": "exited", "exit_code": 0})))  # fmt: skip
        waiter = threading.Thread(target=await_start, daemon=True)
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), "it waited for more than 'started'"
        assert failed == [] and not events.closed
    finally:
        os.close(w)  # (ends a wait for the pipe's end)
    try:
        assert events.next() == Exited(exit_code=0)  # not consumed
    finally:
        os.close(r)


def test_a_vm_that_ended_before_it_started_fails_with_the_vmms_words() -> None:
    """`run -d` printed the id and exited 0 when QEMU died at once: the monitor's
    "started" came before QEMU failed.  Now the end comes first, with its reason."""
    reason = "vmm exited with status 1: qemu-system-x86_64: could not open disk image"
    r = _events({"event": "exited", "exit_code": 255, "end_reason": reason})
    try:
        with pytest.raises(MachineError, match="m1 did not start: vmm exited with status 1: qemu"):
            _await_start(_machine(), EventReader(r))
    finally:
        os.close(r)
    r = _events()
    try:
        with pytest.raises(MachineError, match="did not start: monitor died"):
            _await_start(_machine(), EventReader(r))
    finally:
        os.close(r)


def _follow_events(tmp_path: Path, *events: dict[str, Any]) -> int:
    """What an attached run makes of its monitor's ``events`` (empty logs)."""
    home = Home(tmp_path)
    st = _machine()
    d = MachineStore(home).dir(st.id)
    d.mkdir(parents=True)
    outs = []
    channels = machine_channels(d)
    for log in (channels.stdout_log, channels.stderr_log):
        log.touch()
        outs.append(LogFollower.current(log))
    r = _events(*events)
    try:
        return _follow(home, st, EventReader(r), None, outs, _Interrupts())
    finally:
        os.close(r)
        for out in outs:
            out.close()


def test_an_attached_run_whose_vm_ended_before_it_started_fails_as_run_d(tmp_path: Path) -> None:
    """`ember run` in the foreground exited 255 (the record's code) when QEMU refused the
    machine at once, while `run -d` said 125 with the VMM's words: now both do."""
    reason = "vmm exited with status 1: qemu-system-x86_64: could not open disk image"
    with pytest.raises(MachineError, match="m1 did not start: vmm exited with status 1: qemu"):
        _follow_events(tmp_path, {"event": "exited", "exit_code": 255, "end_reason": reason})
    # a run that started ends with its program's code, whatever it is
    started = {"event": "started", "vmm_pid": 1}
    assert _follow_events(tmp_path, started, {"event": "exited", "exit_code": 255}) == 255
    # stopped (Ctrl-C, ember kill) before it started: the user's doing, not a failure
    killed = {"event": "exited", "exit_code": 137, "end_reason": "killed", "stopped_by_user": True}
    assert _follow_events(tmp_path, killed) == 137


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_monitor_starts_the_vmm_is_not_dropped(tmp_path: Path, sig: int) -> None:
    """Ctrl-C (or a `timeout`'s SIGTERM) after the hand-over, before the monitor records
    the machine running: the attached run took it for ended and dropped the signal, and
    the machine ran on.  It is marked stopped now, which the monitor acts on as it
    records the VMM started (it kills it before the program runs)."""
    from ember.cli.run import _pass_on

    home = Home(tmp_path)
    st = _machine()
    st.status = mstate.CREATED
    MachineStore(home).create(st, "m1")
    d = MachineStore(home).dir(st.id)
    with stoppable_monitor(d) as monitor:
        intr = _Interrupts()
        assert _pass_on(home, d, intr, sig) is None  # (nothing to keep open for)
        assert intr.stops == 1  # a second one kills it
        assert mstate.read_state(d).stopped_by_user
        assert monitor.wait(timeout=10) == 0


def test_a_second_signal_kills_without_waiting_for_the_monitor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second Ctrl-C waited (up to 30 s) inside kill_vmm for the monitor to record
    the end, while nobody read the logs: the monitor's last drain waits for the attached
    reader, so the kill took ~10 s and could lose the last output (--rm removed the logs
    before they were read).  The attached run goes back to reading at once."""
    from ember.cli.run import _pass_on
    from ember.machines import lifecycle

    home = Home(tmp_path)
    st = _machine()
    st.status, st.started_at = mstate.RUNNING, mstate.now()
    MachineStore(home).create(st, "m1")
    d = MachineStore(home).dir(st.id)

    def waited(*args: object, **kwargs: object) -> None:
        raise AssertionError("the attached run waited for the monitor")

    monkeypatch.setattr(lifecycle, "wait_exited", waited)
    import subprocess

    from ember.process import proc_start_time

    monitor = subprocess.Popen(["sleep", "60"])  # a monitor that has not recorded the end
    try:
        with mstate.update(d) as cur:
            cur.monitor_pid, cur.monitor_start = monitor.pid, proc_start_time(monitor.pid)
        intr = _Interrupts()
        intr.stops = 1  # the first one asked for a stop already
        assert _pass_on(home, d, intr, signal.SIGINT) is None
        assert mstate.read_state(d).stopped_by_user  # marked: its end is the host's kill
    finally:
        monitor.kill()
        monitor.wait()


def test_a_signal_between_two_runs_of_an_attached_machine_stops_nothing(tmp_path: Path) -> None:
    """`ember start -a` of a running --restart machine follows that run: a Ctrl-C after it
    ended, while its monitor starts the next one, stops no restart (docker's attach ends
    with the run too)."""
    from ember.cli.run import _pass_on

    home = Home(tmp_path)
    st = _machine()
    st.status, st.restarting, st.restart_policy = mstate.CREATED, True, "always"
    MachineStore(home).create(st, "m1")
    d = MachineStore(home).dir(st.id)
    with stoppable_monitor(d):
        assert _pass_on(home, d, _Interrupts(), signal.SIGINT) is None
        assert not mstate.read_state(d).stopped_by_user


def test_start_attach_of_a_restarting_machine_waits_for_its_next_run(tmp_path: Path) -> None:
    """`ember start -a` of a machine between two runs of its restart policy was refused
    ("is restarting", exit 2); as docker's, it attaches to the next run: the record it
    gets is that run's.  One that stops restarting meanwhile (stopped, or its policy gave
    up) comes back as it is, to be started as any exited machine."""
    import threading
    import time

    from ember.cli.run import _next_run
    from ember.machines import lifecycle

    home = Home(tmp_path)
    st = _machine()
    st.status, st.exit_code, st.restart_policy = mstate.EXITED, 1, "always"
    MachineStore(home).create(st, "m1")
    d = MachineStore(home).dir(st.id)
    with stoppable_monitor(d) as monitor:
        waiting = mstate.read_state(d)

        def next_run() -> None:
            time.sleep(0.3)  # the backoff
            with mstate.update(d) as cur:
                cur.status, cur.exit_code, cur.restart_count = mstate.RUNNING, None, 1

        runner = threading.Thread(target=next_run)
        runner.start()
        got = _next_run(home, waiting)
        runner.join()
        assert (got.status, got.restart_count) == (mstate.RUNNING, 1)
        with mstate.update(d) as cur:  # that run ended: the monitor waits again
            cur.status, cur.exit_code = mstate.EXITED, 1
        lifecycle.stop(home, mstate.read_state(d))  # stopped between two runs
        assert monitor.wait(timeout=10) == 0
        got = _next_run(home, mstate.read_state(d))
        assert (got.status, got.stopped_by_user) == (mstate.EXITED, True)


def test_an_os_error_of_embers_own_is_125_not_the_programs_1(tmp_path: Path) -> None:
    """docker run's 125 is for any failure of its own: an OSError (a full disk, a path
    that is a file) reached main's handler and exited 1, the program's own code."""
    from tests.support.cli import ember_env, run_ember

    home = tmp_path / "home"
    home.mkdir()
    (home / "run").write_text("")  # where ember's run-time directory must be
    res = run_ember("run", "--rm", "oci:/nowhere:latest", "true", env=ember_env(home))
    assert res.returncode == 125, res.stderr
    assert res.stderr.count("\n") == 1 and "run" in res.stderr and "Traceback" not in res.stderr


def test_start_attach_takes_the_code_of_its_run_when_the_next_began_between_two_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ember start -a` of a running machine polls its record: when its restart policy
    began the next run between two looks (the record is that run's, its exit code
    cleared), the attach waited for the next run to end and failed with 125, "removed
    (--rm) before its exit code could be read".  The record keeps the previous run's code."""
    import subprocess

    from ember.process import proc_start_time

    home = Home(tmp_path)
    st = _machine()
    monitor = subprocess.Popen(["sleep", "60"])  # the machine's monitor, alive throughout
    try:
        st.status, st.started_at, st.restart_policy = mstate.RUNNING, mstate.now(), "always"
        st.monitor_pid, st.monitor_start = monitor.pid, proc_start_time(monitor.pid)
        MachineStore(home).create(st, "m1")
        d = MachineStore(home).dir(st.id)
        channels = machine_channels(d)
        outs = []
        for log in (channels.stdout_log, channels.stderr_log):
            log.touch()
            outs.append(LogFollower.current(log, at_end=True))

        following = mstate.read_state(d)  # (read before the stand-in below counts reads)
        # the next run begins only once the attach has read the run it follows
        looked = threading.Event()
        real_read = mstate.read_state

        def read_state(machine_dir: Path) -> MachineState:
            found = real_read(machine_dir)
            looked.set()
            return found

        monkeypatch.setattr(mstate, "read_state", read_state)

        def next_run_at_once() -> None:
            assert looked.wait(30)
            with mstate.update(d) as cur:  # exited with 3 and running again, in one step
                cur.started_at, cur.restart_count = mstate.now(), 1
                cur.exit_code, cur.previous_exit_code = None, 3

        runner = threading.Thread(target=next_run_at_once)
        runner.start()
        try:
            assert _follow(home, following, None, None, outs, _Interrupts()) == 3
        finally:
            runner.join()
            for out in outs:
                out.close()
    finally:
        monitor.kill()
        monitor.wait()
