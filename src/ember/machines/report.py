"""How a machine ended (pure): the guest's exit report, else what the host saw.

The guest is not trusted: its report is size-limited, must be one JSON object with
the contract's fields and sane values, and is ignored otherwise.
"""

from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass

from ember import jsonutil

MAX_REPORT = 4096
#: exit code when the machine ended without telling how the program did
NO_REPORT_EXIT_CODE = 255
_CONSOLE_RE = re.compile(
    rb"^ember-init: (?:exit code (?P<code>\d{1,3})|killed by signal (?P<sig>\d{1,2}))"
    rb"(?P<oom> \(oom(?: killed)?\))?\s*$"
)


@dataclass(frozen=True)
class ExitReport:
    exit_code: int
    signal: int | None
    oom_killed: bool
    #: why init could not run the program (bad user, workdir, ...), from the guest
    error: str | None = None
    #: bytes the program's stdout and stderr ports queued for the host (None: not told)
    sent: tuple[int, int] | None = None
    #: the program cannot be started with this image and config (an unknown user, a
    #: workdir that cannot be made, an exec that fails with ENOENT, ENOTDIR, EACCES,
    #: ENOEXEC or ELOOP; not ENOMEM, E2BIG and the like): the same run fails again
    not_started: bool = False


def said_on_program_stderr(exit_code: int | None, error: str | None) -> bool:
    """Whether the report's error is one the guest's child also wrote on the program's
    stderr (chdir, setuid, exec: 126 or 127 with a reason; a program's own 126/127
    carries none), so that a caller showing that stderr need not say it again."""
    return error is not None and exit_code in (126, 127)


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    signal: int | None
    oom_killed: bool
    #: set when the guest gave no report (killed, crashed)
    end_reason: str | None
    error: str | None = None


def parse_report(data: bytes) -> ExitReport | None:
    """The first line of the status port's output, if it is a valid exit report."""
    line = data[:MAX_REPORT].split(b"\n", 1)[0].strip()
    if not line:
        return None
    try:
        # (an image's bytes, e.g. a user name, may reach init's error text undecoded:
        # that costs the text, not the report)
        obj = jsonutil.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    code, sig, oom = obj.get("exit_code"), obj.get("signal"), obj.get("oom_killed", False)
    if type(code) is not int or not 0 <= code <= 255:
        return None
    if sig is not None and (type(sig) is not int or not 1 <= sig <= 64):
        return None
    if type(oom) is not bool:
        return None
    error = obj.get("error")
    if error is not None:
        if not isinstance(error, str):
            return None
        # shown on the user's terminal: printable text only, one bounded line
        error = "".join(c if c.isprintable() else "?" for c in error[:500]) or None
    not_started = obj.get("not_started", False)
    if type(not_started) is not bool:
        return None
    return ExitReport(code, sig, oom, error, _sent(obj.get("sent")), not_started)


def _sent(value: object) -> tuple[int, int] | None:
    """The ``sent`` counts, if they are two plausible byte counts (else ignored: the host
    then falls back to waiting for quiet)."""
    if not isinstance(value, list) or len(value) != 2:
        return None
    if not all(type(v) is int and 0 <= v < 1 << 53 for v in value):
        return None
    return value[0], value[1]


def parse_console_tail(data: bytes) -> ExitReport | None:
    """ember-init's last console line (``ember-init: exit code N``): a fallback for a
    missing exit report that anything in the guest can forge (``outcome`` says when it
    counts)."""
    lines = data[-MAX_REPORT:].splitlines()
    for at in range(len(lines) - 1, -1, -1):
        m = _CONSOLE_RE.match(lines[at].strip())
        if not m:
            continue
        oom = m.group("oom") is not None
        error = _console_error(lines[:at])
        if m.group("code") is not None:
            code = int(m.group("code"))
            if code > 255:
                return None
            return ExitReport(code, None, oom, error)
        sig = int(m.group("sig"))
        if not 1 <= sig <= 64:
            return None
        return ExitReport(128 + sig, sig, oom, error)
    return None


_CONSOLE_ERROR_RE = re.compile(rb"^ember-init: error: (.+)$")


def _console_error(before: list[bytes]) -> str | None:
    """init's last ``ember-init: error: ...`` line before its exit line: why it could not
    run the program (its status port may not have been up to say it: a root disk that
    never appeared), printable and short."""
    for raw in reversed(before):
        m = _CONSOLE_ERROR_RE.match(raw.strip())
        if m:
            text = m.group(1).decode("utf-8", "replace").strip()
            return "".join(c if c.isprintable() else "?" for c in text[:500]) or None
    return None


_PANIC_RE = re.compile(rb"Kernel panic - not syncing: ?(.*)")
#: how much of the console's end is searched for the panic line (the stack trace and
#: register dump the kernel prints after it take ~3 KB)
PANIC_TAIL = 16 * 1024


def parse_kernel_panic(data: bytes) -> str | None:
    """Why the guest's kernel panicked (its last ``Kernel panic - not syncing:`` line
    in the console's tail), printable and short; None if it did not."""
    for raw in reversed(data[-PANIC_TAIL:].splitlines()):
        m = _PANIC_RE.search(raw)
        if m:
            text = m.group(1).decode("utf-8", "replace").strip()
            return "".join(c if c.isprintable() else "?" for c in text[:200]) or "no reason given"
    return None


#: the end reason of an exit code taken from the console line (``console_said``)
CONSOLE_REASON = "no exit report: the exit code is the guest console's last ember-init line"


def outcome(
    report: ExitReport | None,
    vmm_returncode: int | None,
    vmm_signal: int | None,
    *,
    killed: bool,
    console_said: ExitReport | None = None,
    panic: str | None = None,
) -> Outcome:
    """Combine what the guest said with how the VMM process ended.

    ``killed``: the host ended the VMM (the user's ``kill``, ``rm -f`` or the last step
    of a ``stop`` SIGKILLed it): that is how the machine ended, whatever the guest wrote
    before (any root program in it can write a report or a console line).
    ``report``: the status port's exit report.  ``console_said``: ember-init's last
    console line (``parse_console_tail``), the fallback for a guest whose status port
    gave nothing; but anything in the guest can print that line, so it only counts when
    the guest ended the VM itself (its VMM exited 0: a power-off), where the guest
    decided how it ended anyway, and the end reason says where the code came from.
    ``panic``: why the guest's kernel panicked, if its console says so (the end reason
    of a guest that ended without a report)."""
    if killed:
        return Outcome(128 + _signal.SIGKILL, _signal.SIGKILL, False, "killed")
    if report is not None:
        return Outcome(report.exit_code, report.signal, report.oom_killed, None, report.error)
    if console_said is not None and vmm_signal is None and vmm_returncode == 0:
        said = console_said
        return Outcome(said.exit_code, said.signal, said.oom_killed, CONSOLE_REASON, said.error)
    if vmm_signal == _signal.SIGKILL:
        return Outcome(128 + _signal.SIGKILL, _signal.SIGKILL, False, "killed")
    if vmm_signal is not None:
        return Outcome(NO_REPORT_EXIT_CODE, None, False, f"vmm killed by signal {vmm_signal}")
    if vmm_returncode not in (0, None):
        return Outcome(NO_REPORT_EXIT_CODE, None, False, f"vmm exited with status {vmm_returncode}")
    if panic is not None:
        # (the guest's own words: informative only, they decide nothing)
        return Outcome(
            NO_REPORT_EXIT_CODE, None, False, f"the guest's kernel panicked: {panic}"
        )
    return Outcome(
        NO_REPORT_EXIT_CODE, None, False, "the guest gave no exit report (see console.log)"
    )
