"""The lines a client writes on a machine's control channel (docs/guest.md, "Control"),
and the stop timeouts they carry.

Pure, and light to import: ``ember stop``'s options need the timeouts before any
command runs, without the relay (``ember.machines.control``) and the sockets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.machines.state import MachineState

#: the longest stop timeout the guest takes (its run config's bound)
MAX_STOP_TIMEOUT = 86400
#: a machine's stop timeout unless ``run --stop-timeout`` says otherwise (docker's)
DEFAULT_STOP_TIMEOUT = 10
#: ``run --stop-timeout -1``, ``stop -t -1`` (docker's): no timeout, never SIGKILL
NO_STOP_TIMEOUT = -1
#: after the stop timeout (the guest's SIGKILL of its program), how long the guest gets
#: to end before the host kills its VMM
KILL_GRACE = 5.0
#: ember-init SIGKILLs the program (its exit report still comes back)
KILL_REQUEST = b"kill\n"


def stop_request(timeout: int | None) -> bytes:
    """The control lines of ``ember stop -t``: the guest sends the StopSignal and arms its
    SIGKILL after ``timeout`` seconds (None: never).  The timeout is a line of its own
    before ``stop``: an older monitor drops it and an older ember-init logs and skips it,
    and both still stop the program (with the run config's timeout)."""
    if timeout is not None and not 0 <= timeout <= MAX_STOP_TIMEOUT:
        raise ValueError(f"stop timeout {timeout} is not 0..{MAX_STOP_TIMEOUT} or None")
    return f"stop_timeout {-1 if timeout is None else timeout}\nstop\n".encode()


def signal_request(signo: int) -> bytes:
    """The control line of ``ember kill -s``: ember-init delivers ``signo`` (1-64) to the
    program."""
    if not 1 <= signo <= 64:
        raise ValueError(f"signal {signo} is not 1..64")
    return f"signal {signo}\n".encode()


def stop_timeout_of(st: MachineState) -> int | None:
    """The machine's own stop timeout (``run --stop-timeout``, in its record), as
    ``stop_request`` takes it: None for -1 (no SIGKILL)."""
    value = st.config.get("stop_timeout", DEFAULT_STOP_TIMEOUT)
    if type(value) is not int or not NO_STOP_TIMEOUT <= value <= MAX_STOP_TIMEOUT:
        value = DEFAULT_STOP_TIMEOUT  # (edited by hand: the record is checked for types only)
    return None if value == NO_STOP_TIMEOUT else value
