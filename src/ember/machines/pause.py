"""``ember pause`` / ``unpause``: a running machine frozen whole, and thawed.

Docker freezes a container's processes (the cgroup freezer); a machine is its VMM,
so ember stops that process (SIGSTOP) and continues it (SIGCONT): the guest's vCPUs
and devices stop where they are, its memory stays, nothing inside is told.  Its
clock does not stop with it (the guest reads the host's), so after ``unpause`` its
time has moved on as a frozen container's has.

The marker file ``paused`` in the machine's directory says which run was paused
(its VMM's pid and start time): a marker of an earlier run (a host reboot, a VMM
killed meanwhile) names no process that runs, and counts for nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from ember.fsutil import atomic_write
from ember.locks import FileLock
from ember.machines.errors import MachineError, MachineNotRunning, MachinePaused
from ember.machines.state import RUNNING, MachineState

MARKER = "paused"
#: a restored guest's run is being handed its config (``monitor``): not to be paused, or
#: the monitor takes its silence for a bad template and boots the machine instead
SETTING_UP = "setting-up"
_LOCK = "pause.lock"


def _run(pid: int | None, start: int | None) -> str:
    return f"{pid} {start}\n"


def _names_run(path: Path, st: MachineState) -> bool:
    """Whether the mark at ``path`` names the current run of running machine ``st``."""
    if st.status != RUNNING or st.vmm_pid is None:
        return False
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(64) == _run(st.vmm_pid, st.vmm_start)
    except OSError:
        return False


def is_paused(machine_dir: Path, st: MachineState) -> bool:
    """Whether this run of the machine is paused (a marker of another run is not)."""
    return _names_run(machine_dir / MARKER, st)


def setting_up(machine_dir: Path, pid: int, start: int | None) -> None:
    """The monitor: VMM ``pid``'s guest is being handed its config (``done_setting_up``
    after); a pause meanwhile is refused."""
    atomic_write(machine_dir / SETTING_UP, _run(pid, start).encode(), mode=0o600)


def done_setting_up(machine_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(machine_dir / SETTING_UP)


def refuse_if_paused(machine_dir: Path, st: MachineState, what: str) -> None:
    """``MachinePaused`` for ``what`` (``exec``, ``top``: they need the guest) on a paused machine."""
    if is_paused(machine_dir, st):
        raise MachinePaused(
            f"cannot {what} machine {st.name}: it is paused", hint=f"ember unpause {st.name} first"
        )


def pause(machine_dir: Path, st: MachineState) -> None:
    """Stop the VMM of running machine ``st`` (its record freshly read; the caller checked
    that this VMM runs) and mark this run paused."""
    with FileLock(machine_dir / _LOCK):
        if is_paused(machine_dir, st):
            raise MachineError(f"machine {st.name} is already paused")
        if _names_run(machine_dir / SETTING_UP, st):
            raise MachineError(f"machine {st.name} is still starting", hint="try again in a moment")
        assert st.vmm_pid is not None
        # the mark first: killed between the two, the machine reads as paused while it
        # runs, and unpause puts that right (the other way round, a frozen machine would
        # read as running, and unpause refuse it)
        atomic_write(machine_dir / MARKER, _run(st.vmm_pid, st.vmm_start).encode(), mode=0o600)
        try:
            os.kill(st.vmm_pid, signal.SIGSTOP)
        except OSError as e:  # (only then: an interrupt after the kill leaves it marked)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(machine_dir / MARKER)
            if isinstance(e, ProcessLookupError):
                raise MachineNotRunning(f"machine {st.name} is not running (its VMM is gone)") from None
            raise


def resume(machine_dir: Path, pid: int) -> None:
    """Let VMM ``pid`` run on, paused or not, and drop any mark: what a stop or kill of a
    paused machine does once its request is queued (docker unpauses a container it
    stops or kills)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(machine_dir / MARKER)


def unpause(machine_dir: Path, st: MachineState) -> None:
    """Continue the paused VMM of ``st`` and remove the mark."""
    with FileLock(machine_dir / _LOCK):
        if not is_paused(machine_dir, st):
            raise MachineError(f"machine {st.name} is not paused")
        assert st.vmm_pid is not None
        resume(machine_dir, st.vmm_pid)  # (killed between its two steps: the next unpause)
