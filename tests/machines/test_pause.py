"""``ember pause``'s marker and signals, on a real process standing where the VMM is
(the whole command on a real machine: tests/integration/test_run_vm.py)."""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.machines import pause
from ember.machines import state as mstate
from ember.machines.errors import MachineError, MachineNotRunning, MachinePaused
from ember.machines.state import MachineState, VMConfig
from ember.process import proc_start_time


@pytest.fixture
def vmm() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _machine(pid: int) -> MachineState:
    return MachineState(
        id=secrets.token_hex(32), name="m", image="x", image_digest="sha256:" + "0" * 64,
        created_at=mstate.now(), command=["true"], config={},
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1), status=mstate.RUNNING,
        vmm_pid=pid, vmm_start=proc_start_time(pid),
    )  # fmt: skip


def _process_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat (T: stopped by a signal)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, wanted: str) -> None:
    deadline = time.monotonic() + 10
    while _process_state(pid) != wanted:
        assert time.monotonic() < deadline, f"process {pid} never reached state {wanted}"
        time.sleep(0.01)


def test_pause_stops_the_vmm_and_unpause_continues_it(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    st = _machine(vmm.pid)
    assert not pause.is_paused(tmp_path, st)
    pause.pause(tmp_path, st)
    _wait_state(vmm.pid, "T")
    assert pause.is_paused(tmp_path, st)
    assert (tmp_path / pause.MARKER).stat().st_mode & 0o777 == 0o600
    with pytest.raises(MachineError, match="already paused"):
        pause.pause(tmp_path, st)
    with pytest.raises(MachinePaused, match="cannot stop machine m: it is paused") as refused:
        pause.refuse_if_paused(tmp_path, st, "stop")
    assert refused.value.hint == "ember unpause m first"
    pause.unpause(tmp_path, st)
    _wait_state(vmm.pid, "S")
    assert not pause.is_paused(tmp_path, st) and not (tmp_path / pause.MARKER).exists()
    pause.refuse_if_paused(tmp_path, st, "stop")  # nothing to refuse
    with pytest.raises(MachineError, match="not paused"):
        pause.unpause(tmp_path, st)


def test_a_mark_of_another_run_counts_for_nothing(tmp_path: Path, vmm: subprocess.Popen[bytes]) -> None:
    """A marker left by an earlier run (a reboot, a VMM killed while paused) does not make
    this run paused, nor a machine that is not running."""
    st = _machine(vmm.pid)
    earlier = dataclasses.replace(st, vmm_start=(st.vmm_start or 0) - 100)
    pause.pause(tmp_path, earlier)  # (stops the process: it is the same pid)
    try:
        assert pause.is_paused(tmp_path, earlier) and not pause.is_paused(tmp_path, st)
        assert not pause.is_paused(tmp_path, dataclasses.replace(earlier, status=mstate.EXITED))
        pause.pause(tmp_path, st)  # this run's own mark replaces it
        assert pause.is_paused(tmp_path, st) and not pause.is_paused(tmp_path, earlier)
    finally:
        os.kill(vmm.pid, signal.SIGCONT)


def test_a_mark_without_a_stopped_vmm_is_put_right_by_unpause(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    """What a pause killed between its mark and its SIGSTOP leaves: the machine reads as
    paused though it runs; unpause (a SIGCONT to a running process) clears it."""
    st = _machine(vmm.pid)
    (tmp_path / pause.MARKER).write_text(f"{st.vmm_pid} {st.vmm_start}\n")
    assert pause.is_paused(tmp_path, st)
    _wait_state(vmm.pid, "S")  # it runs (sleeps): never stopped
    pause.unpause(tmp_path, st)
    assert not pause.is_paused(tmp_path, st)
    _wait_state(vmm.pid, "S")


def test_a_vmm_gone_before_its_stop_leaves_no_mark(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    st = _machine(proc.pid)
    proc.wait()
    with pytest.raises(MachineNotRunning, match="its VMM is gone"):  # (a message, not a traceback)
        pause.pause(tmp_path, st)
    assert not (tmp_path / pause.MARKER).exists()


def test_resume_lets_a_stopped_vmm_run_on_and_drops_the_mark(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    """What a stop or kill of a paused machine does once its request is queued."""
    st = _machine(vmm.pid)
    pause.pause(tmp_path, st)
    _wait_state(vmm.pid, "T")
    pause.resume(tmp_path, vmm.pid)
    _wait_state(vmm.pid, "S")
    assert not pause.is_paused(tmp_path, st)


def test_no_pause_while_a_restored_guest_is_handed_its_config(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    """Paused then, its silence made the monitor throw the template away and boot the
    machine again, unpaused (a helper's review)."""
    st = _machine(vmm.pid)
    pause.setting_up(tmp_path, vmm.pid, st.vmm_start)
    with pytest.raises(MachineError, match="still starting"):
        pause.pause(tmp_path, st)
    assert _process_state(vmm.pid) != "T"
    pause.done_setting_up(tmp_path)
    pause.pause(tmp_path, st)
    _wait_state(vmm.pid, "T")
    pause.resume(tmp_path, vmm.pid)
