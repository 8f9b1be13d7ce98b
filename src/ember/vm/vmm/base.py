"""The VMM interface: what ember needs from any hypervisor, and nothing QEMU-specific.

A ``VMSpec`` describes one machine (kernel, initrd, command line, CPUs, memory,
disks, NICs and the host ends of the guest channels); ``VMM.create`` turns it into
a ``VM`` that can be started, killed and waited for (a graceful stop is a line on the
guest's control socket, see ``open_control``).  Another
process (the CLI, while a per-machine monitor owns the hypervisor) can get a
handle to a running VM with ``VMM.attach(spec, pid)``.

The guest channel contract (docs/run-config.md, docs/machines.md) is the same for
every backend: console log, program stdout/stderr logs, a status file holding the
exit report and a control socket taking ``stop``/``kill`` lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ember.process import pid_alive
from ember.vm.vmm.errors import ControlChannelError, VMMError

_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}", re.IGNORECASE)
#: a Linux interface name: at most 15 bytes, no '/', ':', ',' or whitespace
_TAP_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")

ACCELS = ("kvm", "tcg")


@dataclass(frozen=True)
class Disk:
    path: Path
    read_only: bool = False


@dataclass(frozen=True)
class Nic:
    """A virtio NIC backed by an existing host TAP device ("": no host side at all)."""

    tap: str
    mac: str

    def __post_init__(self) -> None:
        # both go into QEMU's option string, where a ',' would start another option
        if not _MAC_RE.fullmatch(self.mac):
            raise VMMError(f"invalid MAC address {self.mac[:40]!r}")
        if self.tap and not _TAP_RE.fullmatch(self.tap):
            raise VMMError(f"invalid TAP device name {self.tap[:40]!r}")


@dataclass(frozen=True)
class Channels:
    """Host ends of the guest channels (paths the VMM writes, a socket it listens on).

    The VMM opens each path for appending and writes: a plain file, or a FIFO that
    a supervisor reads (ember's monitor does, to keep the logs capped)."""

    console_log: Path
    stdout_log: Path
    stderr_log: Path
    status_file: Path
    control_socket: Path
    #: one socket per exec port (``ember exec``: each serves one session at a time, its
    #: client talking to ember-init directly); none: the guest has no exec ports
    exec_sockets: tuple[Path, ...] = ()

    @classmethod
    def in_dir(cls, d: Path) -> Channels:
        return cls(
            console_log=d / "console.log",
            stdout_log=d / "stdout.log",
            stderr_log=d / "stderr.log",
            status_file=d / "status.json",
            control_socket=d / "control.sock",
            exec_sockets=exec_sockets(d),
        )

    def precreate(self) -> None:
        """Create the log files empty so readers can open them before the VMM runs."""
        for p in (self.console_log, self.stdout_log, self.stderr_log, self.status_file):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            os.close(fd)


#: exec ports per machine (init/src/init.h EXEC_PORTS): sessions at once
EXEC_PORTS = 4
PORT_EXEC = "org.ember.exec."


def exec_sockets(d: Path) -> tuple[Path, ...]:
    """The exec ports' sockets of the machine whose directory is ``d``."""
    return tuple(d / f"exec-{n}.sock" for n in range(EXEC_PORTS))


@dataclass(frozen=True)
class VMSpec:
    name: str
    kernel: Path
    initrd: Path | None
    channels: Channels
    memory_mib: int = 512
    cpus: int = 1
    accel: str = "tcg"
    #: kernel arguments added after the backend's own
    cmdline: tuple[str, ...] = ()
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    #: where the VMM's own stderr goes (its diagnostics, not the guest's)
    vmm_log: Path | None = None
    #: a saved VM state to start from instead of booting (``ember.vm.template``); the
    #: spec's devices must be the ones it was saved with
    restore: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.accel not in ACCELS:
            raise VMMError(f"unknown accelerator {self.accel!r} (one of {', '.join(ACCELS)})")
        if not 1 <= self.cpus <= 64:
            raise VMMError(f"cpus must be between 1 and 64, not {self.cpus}")
        if not 32 <= self.memory_mib <= 1 << 20:
            raise VMMError(f"memory must be between 32 MiB and 1 TiB, not {self.memory_mib} MiB")


@dataclass(frozen=True)
class VMExit:
    """How the VMM process ended: its exit status, or the signal that killed it."""

    returncode: int | None
    signal: int | None


class VM(ABC):
    """One machine of a VMM: a process that runs the guest."""

    def __init__(self, spec: VMSpec, pid: int | None = None) -> None:
        self.spec = spec
        self.pid = pid

    @abstractmethod
    def start(self) -> int:
        """Spawn the hypervisor; return its pid.  The guest boots asynchronously."""

    def kill(self) -> None:
        """Kill the hypervisor at once (the guest gets no say)."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    @abstractmethod
    def wait(self, timeout: float | None = None) -> VMExit | None:
        """Wait for the hypervisor to exit; ``None`` if still running after ``timeout``."""

    def console(self) -> Path:
        return self.spec.channels.console_log

    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)


class VMM(ABC):
    name: str

    @abstractmethod
    def create(self, spec: VMSpec) -> VM:
        """Validate ``spec`` and return a VM that is not started yet."""

    @abstractmethod
    def attach(self, spec: VMSpec, pid: int) -> VM:
        """A handle to a VM another process started (stop/kill/wait by pid)."""


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """``path`` as an AF_UNIX address, for bind or connect inside the block: through a
    short ``/proc/self/fd`` alias of its directory when it is too long for ``sun_path``
    (108 bytes; a state directory deep in a test's tmp dir is)."""
    if len(str(path).encode()) <= 100:
        yield str(path)
        return
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dirfd}/{path.name}"
    finally:
        os.close(dirfd)


def listen_unix(path: Path, backlog: int) -> socket.socket:
    """A unix socket listening at ``path`` (a stale one there is replaced), mode 0600."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with unix_address(path) as address:
            s.bind(address)
        os.chmod(path, 0o600)
        s.listen(backlog)
        return s
    except BaseException:
        s.close()
        raise


def open_control(path: Path, timeout: float = 2.0) -> socket.socket:
    """Connect to a control socket: a machine's ``control.sock`` (served by its monitor,
    ``ember.machines.control.ControlRelay``) or the VMM's own (the monitor's).

    QEMU serves one client at a time, queues one more, and drops bytes it has not yet
    handed to the guest when its client hangs up: so the monitor is its only client
    and keeps its connection open.  A refused connection is retried until
    ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        with unix_address(path) as address:
            return _connect_retrying(address, timeout, deadline)
    except OSError as e:
        raise ControlChannelError(
            f"cannot reach the machine's control channel {path}: {e.strerror or e}"
        ) from e


def _connect_retrying(address: str, timeout: float, deadline: float) -> socket.socket:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(address)
            return s
        except ConnectionRefusedError:
            s.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
        except OSError:
            s.close()
            raise


def write_control(s: socket.socket, lines: bytes) -> None:
    """Write control ``lines`` (each ending in a newline) on a connection ``open_control``
    made; ControlChannelError when the channel is gone."""
    try:
        s.sendall(lines)
    except OSError as e:
        raise ControlChannelError(f"cannot write to the machine's control channel: {e}") from e
