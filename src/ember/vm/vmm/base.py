"""The VMM interface: what ember needs from any hypervisor, and nothing QEMU-specific.

A ``VMSpec`` describes one machine (kernel, initrd, command line, CPUs, memory,
disks, NICs and the host ends of the guest channels); ``VMM.create`` turns it into
a ``VM`` that can be started, asked to stop, killed and waited for.  Another
process (the CLI, while a per-machine monitor owns the hypervisor) can get a
handle to a running VM with ``VMM.attach(spec, pid)``.

The guest channel contract (docs/run-config.md, docs/machines.md) is the same for
every backend: console log, program stdout/stderr logs, a status file holding the
exit report and a control socket taking ``stop``/``kill`` lines.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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

    @classmethod
    def in_dir(cls, d: Path) -> Channels:
        return cls(
            console_log=d / "console.log",
            stdout_log=d / "stdout.log",
            stderr_log=d / "stderr.log",
            status_file=d / "status.json",
            control_socket=d / "control.sock",
        )

    def precreate(self) -> None:
        """Create the log files empty so readers can open them before the VMM runs."""
        for p in (self.console_log, self.stdout_log, self.stderr_log, self.status_file):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            os.close(fd)


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

    @classmethod
    def from_wait_status(cls, status: int) -> VMExit:
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        return cls(os.waitstatus_to_exitcode(status), None)


class VM(ABC):
    """One machine of a VMM: a process that runs the guest."""

    def __init__(self, spec: VMSpec, pid: int | None = None) -> None:
        self.spec = spec
        self.pid = pid

    @abstractmethod
    def start(self) -> int:
        """Spawn the hypervisor; return its pid.  The guest boots asynchronously."""

    def stop(self) -> None:
        """Ask the guest to stop gracefully (StopSignal, then SIGKILL after its timeout)."""
        send_control(self.spec.channels.control_socket, "stop")

    def request_kill(self) -> None:
        """Ask the guest's init to SIGKILL the program (the exit report still comes back)."""
        send_control(self.spec.channels.control_socket, "kill")

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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return False


def wait_pid_exit(pid: int, timeout: float | None) -> bool:
    """Wait for a process that is not our child to exit (pidfd); True once it has."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError as e:
        if e.errno == errno.ESRCH:
            return True
        raise
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready) or not pid_alive(pid)
    finally:
        os.close(fd)


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


def write_control(s: socket.socket, command: str) -> None:
    if command not in ("stop", "kill"):
        raise ValueError(command)
    try:
        s.sendall(command.encode() + b"\n")
    except OSError as e:
        raise ControlChannelError(f"cannot write to the machine's control channel: {e}") from e


def send_control(path: Path, command: str, timeout: float = 2.0) -> None:
    """Write one control line (``stop``/``kill``) to the guest's control socket."""
    s = open_control(path, timeout)
    try:
        write_control(s, command)
    finally:
        s.close()
