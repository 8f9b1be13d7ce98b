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
from ember.machines.errors import MachineError, MachinePaused
from ember.machines.state import RUNNING, MachineState

MARKER = "paused"
_LOCK = "pause.lock"


def _run(st: MachineState) -> str:
    return f"{st.vmm_pid} {st.vmm_start}\n"


def is_paused(machine_dir: Path, st: MachineState) -> bool:
    """Whether this run of the machine is paused (a marker of another run is not)."""
    if st.status != RUNNING or st.vmm_pid is None:
        return False
    try:
        with open(machine_dir / MARKER, encoding="ascii", errors="replace") as f:
            return f.read(64) == _run(st)
    except OSError:
        return False


def refuse_if_paused(machine_dir: Path, st: MachineState, what: str) -> None:
    """``MachinePaused`` for ``what`` (``stop``, ``kill``, ``exec`` ...) on a paused machine."""
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
        assert st.vmm_pid is not None
        # the mark first: killed between the two, the machine reads as paused while it
        # runs, and unpause puts that right (the other way round, a frozen machine would
        # read as running, and unpause refuse it)
        atomic_write(machine_dir / MARKER, _run(st).encode(), mode=0o600)
        try:
            os.kill(st.vmm_pid, signal.SIGSTOP)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(machine_dir / MARKER)
            raise


def unpause(machine_dir: Path, st: MachineState) -> None:
    """Continue the paused VMM of ``st`` and remove the mark."""
    with FileLock(machine_dir / _LOCK):
        if not is_paused(machine_dir, st):
            raise MachineError(f"machine {st.name} is not paused")
        assert st.vmm_pid is not None
        with contextlib.suppress(ProcessLookupError):  # killed meanwhile: not paused either
            os.kill(st.vmm_pid, signal.SIGCONT)
        # (killed here: marked, running; the next unpause removes the mark)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(machine_dir / MARKER)
