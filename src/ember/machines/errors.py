"""Errors of the machines area."""

from __future__ import annotations

from ember.errors import EmberError, NotFound, UsageError


class MachineError(EmberError):
    """A machine could not be created, started or controlled."""


class DamagedMachine(MachineError):
    """A machine whose record on disk cannot be read; ``ember rm -f`` removes it."""

    def __init__(self, machine_id: str, reason: str) -> None:
        super().__init__(
            f"machine {machine_id[:12]} has a damaged record ({reason})",
            hint=f"remove it: ember rm -f {machine_id}",
        )
        self.machine_id = machine_id


class MachineNotFound(NotFound, MachineError):
    """No machine has that name or id."""


class AmbiguousMachine(MachineError):
    """An id prefix matches more than one machine (status 1 from every command, as
    docker's: as a usage error it was 2 from `logs` and `port`, 1 from `rm`)."""


class NameInUse(UsageError, MachineError):
    """Another machine already has that name."""


class InvalidOption(UsageError, MachineError):
    """A run option (size, env file, name, ...) is malformed."""


class MachineRunning(UsageError, MachineError):
    """The operation needs a stopped machine."""


class MachineRestarting(MachineRunning):
    """Between two runs of its restart policy: its monitor runs it again soon."""


class MachineNotRunning(UsageError, MachineError):
    """The operation needs a running machine."""


class MachinePaused(UsageError, MachineError):
    """The machine is paused (``ember pause``): what was asked needs it running, as
    docker's.  Not a MachineNotRunning: ``ember stop`` of a stopped machine is fine, of a
    paused one not."""


class ExecError(MachineError):
    """An ``ember exec`` session could not be started or went wrong (exit status 126, as
    docker's for a command it cannot invoke)."""

    exit_code = 126


class ExecBusy(ExecError):
    """Every exec port of the machine has a session."""


class ExecProtocolError(ExecError):
    """The guest sent something that is not a frame of the exec protocol."""
