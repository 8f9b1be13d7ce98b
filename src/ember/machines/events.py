"""What a machine's monitor tells the ``ember run``/``start`` that started it.

JSON lines on a pipe (``MonitorHandle.sync_r``): ``started`` once the VMM got through
its set-up, ``exited`` with how the first run ended, ``error`` when the monitor could
not run the machine at all.  The monitor writes them (``EventWriter``) and never
blocks on the pipe (a gone reader is fine); the CLI reads them (``EventReader``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from typing import ClassVar

from ember import jsonutil
from ember.machines.errors import MachineError
from ember.machines.state import checked_fields


@dataclass(frozen=True)
class Started:
    """The VMM got through its own set-up: ``ember run -d`` and ``start`` return."""

    kind: ClassVar[str] = "started"
    vmm_pid: int


@dataclass(frozen=True)
class Exited:
    """How the machine's first run ended (the record holds the same)."""

    kind: ClassVar[str] = "exited"
    exit_code: int
    signal: int | None = None
    oom_killed: bool = False
    end_reason: str | None = None
    error: str | None = None
    #: its restart policy runs it again (the monitor goes on)
    restarting: bool = False
    #: ``ember stop/kill`` (or Ctrl-C) ended it
    stopped_by_user: bool = False


@dataclass(frozen=True)
class MonitorFailed:
    """The monitor could not run the machine (the record says so too)."""

    kind: ClassVar[str] = "error"
    message: str


Event = Started | Exited | MonitorFailed
_KINDS: dict[str, type[Started] | type[Exited] | type[MonitorFailed]] = {
    cls.kind: cls for cls in (Started, Exited, MonitorFailed)
}
#: no event is longer (the longest, an error, quotes a path or two)
MAX_LINE = 1 << 20


def encode(event: Event) -> bytes:
    return json.dumps({"event": event.kind, **asdict(event)}).encode() + b"\n"


def decode(line: bytes) -> Event | None:
    """The event of one line (without its newline); None for a kind this ember does not
    know, MachineError for a line that is not an event."""
    try:
        data = jsonutil.loads(line)
    except ValueError as e:
        raise MachineError(f"the machine's monitor said something unreadable: {e}") from None
    if not isinstance(data, dict):
        raise MachineError("the machine's monitor said something that is not an event")
    cls = _KINDS.get(str(data.get("event")))
    if cls is None:
        return None
    try:
        return cls(**checked_fields(cls, data))
    except MachineError as e:
        raise MachineError(f"the machine's monitor sent a damaged {cls.kind} event: {e}") from None


class EventWriter:
    """The monitor's end of the pipe (None: nobody follows the machine)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        #: this run started (the VMM got through its set-up): said
        self.started = False

    def send_started(self, vmm_pid: int) -> None:
        """Say once a run that the machine started."""
        if not self.started:
            self.started = True
            self.send(Started(vmm_pid))

    def send(self, event: Event) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, encode(event))
        except OSError:
            self.close()  # the reader went away: keep going without it

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


class EventReader:
    """The CLI's end of the pipe: the monitor's events as they come."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = b""
        self._events: list[Event] = []
        #: the monitor closed its end: no more events
        self.closed = False

    def fileno(self) -> int:
        """For ``select``: readable when ``read_some`` will not block."""
        return self.fd

    def read_some(self) -> list[Event]:
        """The events one read brings (it blocks until the monitor writes or ends)."""
        self._read()
        events, self._events = self._events, []
        return events

    def next(self) -> Event | None:
        """The monitor's next event, however many reads it takes (an error quoting a long
        path does not fit one 4 KB read); None when it ended without one."""
        while not self._events and not self.closed:
            self._read()
        return self._events.pop(0) if self._events else None

    def _read(self) -> None:
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.closed = True
            return
        self._pending += chunk
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            event = decode(line)
            if event is not None:
                self._events.append(event)
        if len(self._pending) > MAX_LINE:
            raise MachineError("the machine's monitor sent a line too long to be an event")
