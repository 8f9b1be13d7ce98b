"""A machine's record on disk: ``$EMBER_HOME/machines/<id>/state.json``.

Written atomically and only under the machine's lock (``lock`` in its directory),
by the CLI (create) and by the machine's monitor (running, exited).  Readers never
lock: they see the old or the new file.  The directory also holds the per-machine
initrd, the console/stdout/stderr logs, the exit report, the control socket and
the monitor's own log.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ember import jsonutil
from ember.fsutil import atomic_write
from ember.locks import FileLock, Notice
from ember.machines.errors import DamagedMachine, InvalidOption, MachineError
from ember.machines.restartpolicy import parse_restart_policy

CREATED = "created"
RUNNING = "running"
EXITED = "exited"
STATUSES = (CREATED, RUNNING, EXITED)


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class VMConfig:
    """What the monitor needs to start the VMM (resolved at create time)."""

    vmm: str
    accel: str
    kernel: str
    initrd: str
    root_disk: str
    memory_mib: int
    cpus: int
    #: extra guest kernel arguments (``--kernel-arg``)
    kernel_args: list[str] = field(default_factory=list)
    #: start by restoring this template state (``ember.vm.template``) with its own initrd,
    #: then send the machine's config (``restore.config`` in the machine's dir)
    restore: str | None = None
    restore_initrd: str | None = None
    #: the base initramfs ``initrd`` was made from (the machine's own link to it, in its
    #: directory; older records name the cache's file): ``ember start`` makes
    #: it again with the machine's new network (None: a machine from an older ember, not
    #: restartable)
    base_initrd: str | None = None
    #: ``-v``: each ``NAME:TARGET[:ro]`` (``ember.volumes.spec``), its disk the guest's
    #: ``/dev/vdb``, ``/dev/vdc``, ... in this order; and those disks' paths, found again
    #: at each start
    volumes: list[str] = field(default_factory=list)
    volume_disks: list[str] = field(default_factory=list)


@dataclass
class MachineState:
    id: str
    name: str
    image: str
    image_digest: str
    created_at: str
    #: the command as the guest will run it (for ps), and the run config's summary
    command: list[str]
    config: dict[str, Any]
    vm: VMConfig
    network: dict[str, Any] | None = None
    auto_remove: bool = False
    status: str = CREATED
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    #: how the machine ended when the guest could not say (killed, crashed, lost)
    end_reason: str | None = None
    monitor_pid: int | None = None
    #: the monitor's start time (clock ticks since boot): pid + start time name one process
    monitor_start: int | None = None
    vmm_pid: int | None = None
    #: the VMM's start time: with ``vmm_pid`` it names that process (its command line,
    #: which an escaped QEMU may rewrite, does not)
    vmm_start: int | None = None
    error: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    #: ``--restart`` (machines.restartpolicy), how often the monitor restarted the
    #: machine, and whether ``ember stop/kill/rm -f`` ended its last run (no restart then)
    restart_policy: str = "no"
    restart_count: int = 0
    #: the exit code of the run before this one, when its monitor restarted the machine
    #: (``ember start -a`` attached to that run finds it here once the next one began)
    previous_exit_code: int | None = None
    stopped_by_user: bool = False
    #: the monitor gave up restarting it (``error`` says why); it exits next
    restart_given_up: bool = False
    #: created again by its monitor under the restart policy (``ember start`` names the
    #: monitor it started too, in ``monitor_pid``, but is no restart)
    restarting: bool = False

    @property
    def may_restart(self) -> bool:
        """Exited, and its restart policy runs it again after this run: its monitor waits
        to, if it is alive (``lifecycle.restart_pending``).  The policy itself is asked:
        after on-failure's last retry (or an exit 0) the monitor lives a moment longer,
        and the machine read as restarting meanwhile."""
        if self.status != EXITED or self.restart_given_up:
            return False
        try:
            policy = parse_restart_policy(self.restart_policy)
        except InvalidOption:
            return False  # (checked when the machine was made: a damaged record)
        return policy.should_restart(self.exit_code, self.restart_count, self.stopped_by_user)

    @property
    def between_restarts(self) -> bool:
        """Between two runs of its restart policy, if its monitor is alive: exited and
        waiting to run again, or being started again (``lifecycle.prepare_start``)."""
        return self.may_restart or (self.status == CREATED and self.restarting)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def record_not_started(self, message: str, reason: str) -> None:
        """A run that never began: exited with 125, Docker's code for a container that
        could not be started."""
        self.status, self.finished_at = EXITED, now()
        self.exit_code, self.error, self.end_reason = 125, message, reason
        self.restarting = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> MachineState:
        """The record ``to_json`` wrote; MachineError naming what is wrong otherwise
        (every command reads these: a damaged one must not surface as a TypeError
        three calls later)."""
        if not isinstance(data, dict):
            raise MachineError(f"expected an object, found {type(data).__name__}")
        values = checked_fields(cls, data)
        if not isinstance(data.get("vm"), dict):
            raise MachineError("field 'vm' is missing or not an object")
        values["vm"] = VMConfig(**checked_fields(VMConfig, data["vm"]))
        if values.get("network"):  # (None or empty: no network, as every reader takes it)
            _check_network(values["network"])
        st = cls(**values)
        if st.status not in STATUSES:
            raise MachineError(f"machine {st.id[:12]} has an unknown status {st.status!r}")
        for name in ("monitor_pid", "vmm_pid"):  # signalled and looked up in /proc
            pid = getattr(st, name)
            if pid is not None and not 0 < pid <= PID_MAX_LIMIT:
                raise MachineError(f"field {name!r} is no process id ({pid})")
        for name in ("created_at", "started_at", "finished_at"):  # compared with now()
            text = getattr(st, name)
            if text is not None and not _aware_time(text):
                raise MachineError(f"field {name!r} is no time with a time zone ({text[:40]!r})")
        return st


#: the largest process id Linux hands out (its PID_MAX_LIMIT on 64-bit hosts)
PID_MAX_LIMIT = 1 << 22


def _aware_time(text: str) -> bool:
    try:
        return _dt.datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


# The JSON types each annotation allows (the dataclasses above and the monitor's events,
# ember.machines.events, use no others).
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "bool": (bool,), "list[str]": (list,),
    "dict[str, Any]": (dict,), "dict[str, str]": (dict,), "VMConfig": (dict,),
}  # fmt: skip


def checked_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data``'s fields of dataclass ``cls``, each of its declared JSON type (None where
    the annotation allows it); MachineError for a missing or mistyped one."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise MachineError(f"field {f.name!r} is missing")
            continue
        value = data[f.name]
        annotation = str(f.type)
        optional = annotation.endswith(" | None")
        base = annotation.removesuffix(" | None")
        if value is None and optional:
            out[f.name] = value
            continue
        allowed = _JSON_TYPES[base]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise MachineError(f"field {f.name!r} has the wrong type ({type(value).__name__})")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise MachineError(f"field {f.name!r} must be a list of strings")
        out[f.name] = value
    return out


# The record's ``network``: what ``MachineNetwork.to_json`` (ember.net.manager) writes, as
# ``ember start``, the monitor and ``ps``/``port`` read it.  Checked here for its types
# only (the values are the network's to check): ember.net is too heavy to import for
# every ``ember ps``.
_NETWORK_FIELDS: dict[str, tuple[type, ...]] = {
    "machine_id": (str,), "tap": (str,), "mac": (str,), "network": (str,), "guest_ip": (str,),
    "gateway": (str,), "prefix": (int,), "mtu": (int,),
}  # fmt: skip
_PORT_FIELDS: dict[str, tuple[type, ...]] = {
    "host_port": (int,), "guest_port": (int,), "protocol": (str,),
}  # fmt: skip


def _check_network(net: dict[str, Any]) -> None:
    """MachineError naming what is wrong with the record's ``network`` section."""

    def damaged(what: str) -> MachineError:
        return MachineError(f"field 'network': {what}")

    def check(obj: dict[str, Any], wanted: dict[str, tuple[type, ...]], where: str) -> None:
        for key, types in wanted.items():
            if key not in obj:
                raise damaged(f"{where}{key!r} is missing")
            value = obj[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise damaged(f"{where}{key!r} has the wrong type ({type(value).__name__})")

    check(net, _NETWORK_FIELDS, "")
    nameservers = net.get("nameservers", [])
    if not isinstance(nameservers, list) or not all(isinstance(n, str) for n in nameservers):
        raise damaged("'nameservers' must be a list of strings")
    ports = net.get("ports", [])
    if not isinstance(ports, list):
        raise damaged("'ports' must be a list")
    for i, port in enumerate(ports):
        if not isinstance(port, dict):
            raise damaged(f"port {i} is not an object")
        check(port, _PORT_FIELDS, f"port {i}: ")
        if not isinstance(port.get("host_ip"), str | None):
            raise damaged(f"port {i}: 'host_ip' must be a string")
        bounds = port.get("host_range")
        if bounds is not None and not (
            isinstance(bounds, list) and len(bounds) == 2
            and all(type(b) is int for b in bounds)
        ):  # fmt: skip
            raise damaged(f"port {i}: 'host_range' must be two whole numbers")
    if not isinstance(net.get("netns"), dict | None):
        raise damaged("'netns' must be an object")


def state_path(machine_dir: Path) -> Path:
    return machine_dir / "state.json"


def read_state(machine_dir: Path) -> MachineState:
    """The machine's record; FileNotFoundError while it is created or removed,
    DamagedMachine when it cannot be read."""
    path = state_path(machine_dir)
    try:
        data = jsonutil.loads(path.read_bytes())
        st = MachineState.from_json(data)
    except FileNotFoundError:
        raise
    except MachineError as e:
        raise DamagedMachine(machine_dir.name, e.message) from None
    except (OSError, ValueError, TypeError) as e:
        raise DamagedMachine(machine_dir.name, f"{path.name}: {e}") from None
    if st.id != machine_dir.name:
        # Every path of a machine is found by its id (its directory, its disk, its
        # network): a record copied into another machine's directory would have `rm`
        # free that other machine's.
        raise DamagedMachine(
            machine_dir.name, f"{path.name} names another machine ({st.id[:64]!r})"
        )
    return st


def write_state(machine_dir: Path, st: MachineState) -> None:
    atomic_write(state_path(machine_dir), json.dumps(st.to_json(), indent=1).encode(), 0o600)


def locked(machine_dir: Path) -> FileLock:
    """The machine's lock (enter it): held while its record is read and rewritten."""
    return FileLock(machine_dir / "lock")


#: the lock file ``creating`` holds
CREATING = "creating"


def creating(machine_dir: Path, notice: Notice | None = None) -> FileLock:
    """Held by the command creating the machine, from before its first record until its
    root disk, network and run config are made or undone (``lifecycle.create``): a
    removal meanwhile would free them while they are being made."""
    return FileLock(machine_dir / CREATING, notice=notice)


@contextmanager
def update(machine_dir: Path) -> Iterator[MachineState]:
    """Read-modify-write under the machine's lock."""
    with locked(machine_dir):
        st = read_state(machine_dir)
        yield st
        write_state(machine_dir, st)


# ---- the exit codes of removed (--rm) machines ----------------------------------------

#: how long the exit code of a ``--rm`` machine is kept after its removal, for an
#: ``ember wait`` that was waiting for it (docker's daemon keeps it in memory)
REMOVED_EXIT_KEEP_S = 600


def _removed_exits(run_dir: Path) -> Path:
    return run_dir / "removed-exits"


def record_removed_exit(run_dir: Path, st: MachineState) -> None:
    """Keep the exit code of a machine about to be removed (``--rm``) under its id, so
    that ``ember wait`` can still print it; older records are pruned meanwhile."""
    d = _removed_exits(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    limit = _dt.datetime.now().timestamp() - REMOVED_EXIT_KEEP_S
    with os.scandir(d) as entries:
        for e in entries:
            try:
                if e.stat().st_mtime < limit:
                    os.unlink(e.path)
            except FileNotFoundError:
                pass
    code = st.exit_code if st.exit_code is not None else 255
    atomic_write(d / st.id, json.dumps({"exit_code": code, "name": st.name}).encode(), 0o600)


def removed_exit_code(run_dir: Path, machine_id: str) -> int | None:
    """The exit code ``record_removed_exit`` kept for ``machine_id`` (None: none kept)."""
    try:
        data = jsonutil.loads((_removed_exits(run_dir) / machine_id).read_bytes())
    except (OSError, ValueError):
        return None
    code = data.get("exit_code") if isinstance(data, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None
