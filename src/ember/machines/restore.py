"""What the monitor does when a restored template did not acknowledge its run config.

Pure decision, no I/O (the monitor gathers the facts).  The rule that matters: once
the config has gone out, the guest may have taken it and started the program, so the
machine is booted afresh only when there is no sign of that; running a user's
program twice is worse than reporting one failed start.
"""

from __future__ import annotations

import enum
import signal

from ember.vm.vmm.base import VMExit


class AfterRestore(enum.Enum):
    #: go on with the restored VM (it runs, or ran: its exit report tells how it went)
    KEEP = "keep"
    #: the VMM was killed (``ember kill``/``rm -f``) while restoring: nothing to redo
    KILLED = "killed"
    #: the template did not take: drop it and boot the machine's kernel instead
    BOOT = "boot"


def after_unacknowledged_restore(
    config_sent: bool, ended: VMExit | None, program_spoke: bool, stopped_by_user: bool = True
) -> AfterRestore:
    """``config_sent``: the whole config reached the VMM's socket; ``ended``: the VMM's
    exit if it has exited (``None``: still running); ``program_spoke``: the guest wrote
    on the program's stdout or stderr port, or sent its exit report, since the restore;
    ``stopped_by_user``: the record says ``ember stop/kill/rm -f`` came."""
    if ended is not None and ended.signal is not None:
        if stopped_by_user or ended.signal == signal.SIGKILL:
            # the user's kill, or the host's OOM killer: the template is not to blame
            return AfterRestore.KILLED
        # another signal nobody sent: the VMM crashed on the state (an abort, a segfault
        # while loading it), which every machine of the shape would do: a failed load
        return AfterRestore.KEEP if config_sent and program_spoke else AfterRestore.BOOT
    if not config_sent:
        return AfterRestore.BOOT  # ember-init acts only on a whole config
    if program_spoke:
        return AfterRestore.KEEP
    if ended is None:
        # still running, no answer in the whole timeout and nothing from the program: a
        # hung restore (ember-init answers before it starts the program)
        return AfterRestore.BOOT
    # a VMM that could not load the state exits with an error before the guest runs;
    # a guest that ran and powered off makes it exit cleanly
    return AfterRestore.KEEP if ended.returncode == 0 else AfterRestore.BOOT
