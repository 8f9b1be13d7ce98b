"""Creating, starting, stopping, killing and removing machines (the host side).

``create`` assembles everything a machine needs (image, root disk, network, run
config, initrd) and records it; ``start`` hands the machine to its monitor
(``ember.machines.monitor``), a small detached process that owns the VMM, so a
machine outlives the CLI that started it.  ``stop``/``kill``/``remove`` work from
any process through the state on disk, the guest's control socket and pids.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import EmberError
from ember.fsutil import atomic_write
from ember.home import Home
from ember.locks import Notice, is_held
from ember.machines import pause as mpause
from ember.machines import state as mstate
from ember.machines.controllines import (
    DEFAULT_STOP_TIMEOUT,
    KILL_GRACE,
    KILL_REQUEST,
    MAX_STOP_TIMEOUT,
    NO_STOP_TIMEOUT,
    signal_request,
    stop_request,
)
from ember.machines.errors import (
    DamagedMachine,
    InvalidOption,
    MachineError,
    MachineNotFound,
    MachineNotRunning,
    MachineRestarting,
    MachineRunning,
)
from ember.machines.logs import LogConfig
from ember.machines.restartpolicy import RestartPolicy
from ember.machines.state import MachineState, VMConfig
from ember.machines.store import MachineStore
from ember.net.ports import (
    PortMapping,
    check_port_count,
    exposed_mappings,
    unpublished_exposed,
)
from ember.process import pid_alive, proc_start_time, reap_exiting, wait_pid_exit
from ember.vm.vmm.base import Channels, open_control, write_control
from ember.vm.vmm.errors import ControlChannelError

if TYPE_CHECKING:
    import socket
    from concurrent.futures import Future, ThreadPoolExecutor

    from ember.images.model import Image
    from ember.net.manager import MachineNetwork
    from ember.vm.kernel import KernelInfo
    from ember.vm.runconfig import HostEntry, Mount, RunConfig, RunOverrides
    from ember.vm.template import Template
    from ember.volumes.spec import VolumeMount

log = logging.getLogger("ember.machines")

DEFAULT_MEMORY_MIB = 512
DEFAULT_CPUS = 1

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class RunRequest:
    image: str
    args: tuple[str, ...] = ()
    name: str | None = None
    env: tuple[str, ...] = ()
    #: None: the image's; () clears it (``--entrypoint ""``)
    entrypoint: tuple[str, ...] | None = None
    user: str | None = None
    workdir: str | None = None
    ports: tuple[PortMapping, ...] = ()
    #: ``-P``: also publish the image's ExposedPorts that ``ports`` does not
    publish_all: bool = False
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = DEFAULT_CPUS
    disk_size: int | None = None
    kernel: Path | None = None
    #: ``lib/modules/<version>`` of ``kernel`` (None: everything the guest needs is built in)
    kernel_modules: Path | None = None
    #: extra guest kernel arguments, after ember's own (so ``loglevel=7`` wins over quiet)
    kernel_args: tuple[str, ...] = ()
    auto_remove: bool = False
    network: str = "default"
    #: None: the default; ``NO_STOP_TIMEOUT``: no SIGKILL
    stop_timeout: int | None = None
    plain_http: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    #: None: the machine id's first 12 characters, as docker's
    hostname: str | None = None
    #: ``--add-host`` as ``NAME:ADDR`` (``options.parse_add_hosts``; ADDR may be host-gateway)
    extra_hosts: tuple[str, ...] = ()
    #: ``--dns`` (none: the host's, as the network set-up finds them) and ``--dns-search``
    dns: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    #: ``-v NAME:TARGET[:ro]``: volumes, made empty when they do not exist yet
    volumes: tuple[VolumeMount, ...] = ()
    #: ``-i``: the program's stdin held open for ``ember run -i`` / ``ember attach`` to write
    interactive: bool = False
    #: ``-t``: a terminal for the program, of (rows, columns) at first
    tty: tuple[int, int] | None = None


def machine_channels(d: Path) -> Channels:
    return Channels.in_dir(d)


def create(
    home: Home,
    req: RunRequest,
    progress: Progress = _quiet,
    made: list[str] | None = None,
    monitor_pid: int | None = None,
) -> MachineState:
    """Everything but booting: the machine exists afterwards with status ``created``.

    ``monitor_pid``: the monitor the caller started to hand the machine to (``ember
    run``), named in the first record as ``ember start`` names its own: a removal or a
    stop between this and the monitor's start of the VMM then marks the machine stopped
    and waits for that monitor (which kills the VMM it was starting), as for a start.

    ``made`` gets the machine's id before anything of it exists: a caller interrupted
    after ``create`` returned (before it could hand the machine to its monitor) removes
    it with ``discard``.  A failure or an interrupt inside ``create`` undoes what it
    made itself, the root disk included even when its clone is still under way (it is
    released when the clone ends)."""
    from ember.images import ImageService
    from ember.net.manager import NetConfig
    from ember.snapshots.chain import clone_root_disk
    from ember.snapshots.config import SnapshotConfig
    from ember.vm.initramfs import base_initramfs, pin_base_initramfs
    from ember.vm.runconfig import RootDevice, RunConfig
    from ember.vm.vmm.accel import detect_accel

    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal t0
        t = time.perf_counter()
        timings[what] = round(t - t0, 4)
        t0 = t

    store = MachineStore(home)
    # a broken section of config.json fails the run now: not in the monitor after the
    # boot began (logs), nor after a kernel install and an accelerator probe (network,
    # snapshots)
    LogConfig.load(home)
    NetConfig.load(home)
    SnapshotConfig.load(home)
    # An image that is not local is pulled while the rest is set up: handed out once its
    # config is checked, its layers still arriving (built into the root disk's snapshot
    # chain as they do, in the clone below).  ``pulling.close()`` once the disk is made
    # records the image and lets go of the pull's lock (``ember gc`` waits for it); a
    # failure or an interrupt before that cancels the pull.
    with contextlib.ExitStack() as pulling:
        pulled = pulling.enter_context(
            ImageService(home).ensuring(req.image, plain_http=req.plain_http)
        )
        image = pulled.image
        lap("image")
        kernel = _guest_kernel(home, req, progress)
        accel = detect_accel(home, kernel.vmlinux)
        base_initrd = base_initramfs(home, kernel)
        lap("kernel")
        # validate the run config before anything is allocated
        draft = RunConfig.from_image(
            image.config, _run_overrides(req), nameservers=req.dns, search=req.dns_search,
            mounts=_volume_mounts(req.volumes), open_stdin=req.interactive, tty=req.tty,
        )  # fmt: skip
        # the extra hosts are added at each start (host-gateway: that start's gateway),
        # counted here at their longest
        dataclasses.replace(
            draft, hosts=_extra_host_entries(req.extra_hosts, gateway=_LONGEST_IPV4)
        ).check_room()
        ports = req.ports
        if req.publish_all:
            ports += exposed_mappings(image.config.exposed_ports, req.ports)
            left_out = unpublished_exposed(image.config.exposed_ports)
            if left_out:
                shown = ", ".join(repr(k[:40]) for k in left_out[:5])
                more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
                log.warning("-P does not publish the image's %s%s: ember publishes tcp and udp ports only",
                            shown, more)
        check_port_count(ports)

        # secrets, subprocess and concurrent.futures (~8 ms) are imported where a machine is
        # made or its monitor started, not by `ember ps/logs/stop` that only check on one
        import secrets
        from concurrent.futures import ThreadPoolExecutor, wait

        machine_id = secrets.token_hex(32)
        d = store.root / machine_id
        own_base = d / BASE_INITRD
        st = _new_state(machine_id, d, req, image, draft, kernel, own_base, accel)
        if monitor_pid is not None:
            st.monitor_pid, st.monitor_start = monitor_pid, proc_start_time(monitor_pid)
        if made is not None:
            made.append(machine_id)  # before anything exists: no moment the caller misses it
        cloning: Future[Path] | None = None
        pool = None
        hold = mstate.creating(d)
        try:
            store.create(st, req.name, holding=hold)
            pin_base_initramfs(base_initrd, own_base)
            # after the record that names them: `ember volume rm` looks for such records, and
            # a start that checks after this sees this machine as their user
            with attaching_volumes(home, st, make=True) as volumes:
                pass
            lap("record")
            # the disk clone and the network (TAP, nft) both wait on the kernel and on
            # subprocesses: do them side by side
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-clone")
            # the chain is built from each layer's first bytes while they arrive (a
            # pull still under way: ``ensuring`` above)
            cloning = pool.submit(
                clone_root_disk, home, image, machine_id, req.disk_size,
                layer_path=pulled.layer_path, open_layer=pulled.open_layer,
            )  # fmt: skip
            try:
                net = _setup_network(home, machine_id, ports=ports, network=req.network)
            except BaseException:
                pulled.cancel()  # the clone may be waiting on layers: not for them now
                raise
            finally:
                wait([cloning])  # never leave the clone running behind a failure
            disk = cloning.result()
            pool.shutdown()
            pulling.close()  # every layer is in the disk
            lap("root_disk+network")
            if _copy_up_volumes(home, image, req.volumes):
                lap("volume_copy_up")
            rc = dataclasses.replace(
                draft,
                hostname=req.hostname or machine_id[:12],
                root=RootDevice("/dev/vda", "ext4", "defaults"),
                # the monitor says "bye" once it has the guest's last output (see streams.py)
                exit_ack_ms=EXIT_ACK_MS,
            )
            restore, template_key = _template_for(home, req, kernel, base_initrd, accel)
            atomic_write(d / RUN_CONFIG, rc.render(), 0o600)
            _write_boot_config(
                d, st.name, rc, net, own_base, req.extra_hosts, templated=restore is not None
            )
            machine_channels(d).precreate()
            lap("config_initrd")
            config = _config_summary(
                rc, kernel, req.extra_hosts, no_kill=req.stop_timeout == NO_STOP_TIMEOUT
            )
            st = _finish_record(d, disk, volumes, restore, template_key, net, config, timings)
        except BaseException:
            _undo_create(home, machine_id, cloning, pool)
            raise
        finally:
            hold.release()  # after any undo: a removal waiting for it finds nothing half made
    # the snapshot chain's applier child, told to exit once the last layer was built
    # (process.reap_later), is surely gone by now: reaped, not left a zombie for the
    # life of an attached run
    reap_exiting()
    return st


def _guest_kernel(home: Home, req: RunRequest, progress: Progress) -> KernelInfo:
    """The kernel the machine boots: the one the run or config.json names, else the
    installed one, else Debian's, installed now."""
    from ember.vm.errors import KernelNotFound
    from ember.vm.kernel import configured_kernel, find_kernel, install_kernel

    try:
        return find_kernel(home, req.kernel, req.kernel_modules)
    except KernelNotFound:
        # a kernel the user named (--kernel, or config.json) that is not there is their
        # mistake to hear about, not a reason to install and boot Debian's instead
        if req.kernel is not None or configured_kernel(home) is not None:
            raise
        progress("no guest kernel installed yet: installing Debian's linux-image-amd64")
        return install_kernel(home)


def _run_overrides(req: RunRequest) -> RunOverrides:
    """What the run asks to change of the image's config."""
    from ember.vm.runconfig import RunOverrides

    return RunOverrides(
        entrypoint=req.entrypoint,
        args=req.args or None,
        env=req.env,
        user=req.user,
        workdir=req.workdir,
        # a run config holds 0..86400 (as ember-init reads it), so "no SIGKILL" is the
        # record's -1, which every stop sends on its control line (``stop_timeout_of``);
        # the config's longest timeout only covers a bare `stop` from elsewhere
        stop_timeout=MAX_STOP_TIMEOUT if req.stop_timeout == NO_STOP_TIMEOUT else req.stop_timeout,
    )


def _new_state(
    machine_id: str,
    d: Path,
    req: RunRequest,
    image: Image,
    draft: RunConfig,
    kernel: KernelInfo,
    base_initrd: Path,
    accel: str,
) -> MachineState:
    """The record of a machine about to be made in ``d``: no root disk or network yet."""
    return MachineState(
        id=machine_id,
        name="",
        image=image.reference,
        image_digest=str(image.manifest_digest),
        created_at=mstate.now(),
        command=list(draft.argv),
        config={},
        vm=VMConfig(
            vmm="qemu",
            accel=accel,
            kernel=str(kernel.vmlinux if kernel.vmlinux else kernel.vmlinuz),
            initrd=str(d / "initrd.img"),
            base_initrd=str(base_initrd),
            root_disk="",
            memory_mib=req.memory_mib,
            cpus=req.cpus,
            kernel_args=list(req.kernel_args),
            volumes=[str(v) for v in req.volumes],
        ),
        auto_remove=req.auto_remove,
        labels=dict(req.labels),
        restart_policy=str(req.restart),
    )


def _config_summary(
    rc: RunConfig, kernel: KernelInfo, extra_hosts: Sequence[str], *, no_kill: bool
) -> dict[str, Any]:
    """The record's ``config``: what the machine runs and how it is stopped, and the
    ``--add-host`` entries each start adds to its hosts (``extra_hosts_of``)."""
    return {
        "argv": list(rc.argv),
        "env": list(rc.env),
        "user": rc.user,
        "workdir": rc.workdir,
        "hostname": rc.hostname,
        "extra_hosts": list(extra_hosts),
        "dns": list(rc.nameservers),
        "dns_search": list(rc.search),
        "stop_signal": rc.stop_signal,
        "stop_timeout": NO_STOP_TIMEOUT if no_kill else rc.stop_timeout,
        "kernel_version": kernel.version,
        "open_stdin": rc.open_stdin,
        "tty": rc.tty is not None,
    }


def _finish_record(
    d: Path,
    disk: Path,
    volumes: Sequence[Path],
    restore: Template | None,
    template_key: str | None,
    net: MachineNetwork,
    config: dict[str, Any],
    timings: dict[str, float],
) -> MachineState:
    """The record of machine ``d`` once it has all it needs to start."""
    with mstate.update(d) as cur:
        cur.vm.root_disk = str(disk)
        cur.vm.volume_disks = [str(v) for v in volumes]
        if restore is not None:
            cur.vm.restore, cur.vm.restore_initrd = str(restore.state), str(restore.initrd)
        if template_key:
            cur.labels["ember.template"] = template_key
        cur.network = net.to_json()
        cur.config = config
        cur.labels["ember.timings.create"] = ",".join(f"{k}={v}" for k, v in timings.items())
    return cur


def _undo_create(
    home: Home,
    machine_id: str,
    cloning: Future[Path] | None,
    pool: ThreadPoolExecutor | None,
) -> None:
    """Remove what a failed or interrupted ``create`` made of machine ``machine_id``."""
    from ember.net.manager import NetworkManager
    from ember.snapshots.chain import release_root_disk
    from ember.snapshots.interrupts import deferred

    # a second Ctrl-C must not cut the cleanup in half
    with deferred():
        left: list[str] = []
        try:
            NetworkManager(home).teardown(machine_id)
        except Exception as e:  # (the create's own failure is the one raised)
            left.append(f"its network: {e}")
        if cloning is None:
            try:
                release_root_disk(home, machine_id)
            except Exception as e:
                left.append(f"its root disk: {e}")
        else:
            # released once the clone is over, by whichever thread sees it end: an
            # interrupt in wait() in ``create`` leaves it running, and what it then makes
            # must go too (the interpreter waits for the thread before it exits)
            cloning.add_done_callback(lambda _f: _release_quietly(home, machine_id))
        if pool is not None:
            pool.shutdown(wait=False)
        if left:
            # the record stays, so that `rm -f` can free the rest: without it, a network
            # entry nothing removes held its address and host ports for good
            short = machine_id[:12]
            log.warning("machine %s was not completely undone (%s); ember rm -f %s "
                        "frees the rest", short, "; ".join(left), short)  # fmt: skip
            return
        MachineStore(home).remove_dir(machine_id)


def _release_quietly(home: Home, machine_id: str) -> None:
    from ember.snapshots.chain import release_root_disk

    try:
        release_root_disk(home, machine_id)
    except Exception as e:  # a cleanup: say it, do not mask the cause
        log.warning("cannot release machine %s's root disk: %s", machine_id[:12], e)


def discard(home: Home, machine_id: str) -> None:
    """Remove a machine that was never handed to a monitor (``create`` or ``run``
    interrupted): its network, root disk and record, whichever exist (idempotent)."""
    from ember.snapshots.interrupts import deferred

    with deferred():
        _release_and_delete(home, machine_id, machine_id[:12])


#: how long a finished guest waits for its monitor's "bye" before powering off anyway
EXIT_ACK_MS = 3000
#: the run config a restored machine's monitor sends it (rendered, 0600)
RESTORE_CONFIG = "restore.config"
#: the machine's run config without its network (rendered, 0600): ``ember start`` adds
#: the network it gets then
RUN_CONFIG = "run.config"
#: the machine's link to the base initramfs it was made with (initramfs.pin_base_initramfs)
BASE_INITRD = "base.initrd"


def _copy_up_volumes(home: Home, image: Image, volumes: Sequence[VolumeMount]) -> bool:
    """Docker's copy-up (docs/volumes.md): each volume no machine has had attached gets
    the image's files at its target, unless its ``-v`` says ``nocopy``; whether any
    volume was looked at.  Under the volumes' locks; this machine's record (made before) already
    keeps every other machine from attaching them."""
    wanted = [v for v in volumes if v.copy]
    if not wanted or not image.layers:  # an image of no layers has no files to copy
        return False
    from ember.snapshots.chain import chain_names
    from ember.snapshots.snapshotter import Snapshotter
    from ember.volumes.copyup import copy_up
    from ember.volumes.store import Volumes

    snap = Snapshotter(home)
    top = chain_names(image)[-1]  # leased for this machine by clone_root_disk
    with Volumes(home).holding(v.name for v in wanted) as get:
        for v in wanted:
            if copy_up(snap, top, get(v.name, False), v.target):
                log.info("volume %s: copied the image's files at %s into it", v.name, v.target)
    return True


def _volume_mounts(volumes: Sequence[VolumeMount]) -> tuple[Mount, ...]:
    """What ember-init mounts, in order: the machine's volumes (its disks after the root
    disk, in the order given), a target before the ones inside it."""
    from ember.vm.runconfig import Mount
    from ember.volumes.spec import mount_order

    return tuple(
        Mount(volumes[i].device(i), volumes[i].target, "ext4",
              "ro" if volumes[i].read_only else "rw")
        for i in mount_order(volumes)
    )  # fmt: skip


def volumes_of(st: MachineState) -> tuple[VolumeMount, ...]:
    """The ``-v`` volumes of a machine's record (DamagedMachine if malformed)."""
    from ember.volumes.errors import InvalidVolumeSpec
    from ember.volumes.spec import parse_volumes

    try:
        return parse_volumes(st.vm.volumes)
    except InvalidVolumeSpec as e:
        raise DamagedMachine(st.id, f"'vm.volumes': {e.message}") from None


def volumes_in_use(home: Home) -> tuple[set[str], list[DamagedMachine]]:
    """The names of the volumes any machine's record names, whatever its state, and the
    records that cannot be read (they may name more)."""
    found, damaged = MachineStore(home).scan()
    used: set[str] = set()
    for m in found:
        try:
            used.update(v.name for v in volumes_of(m))
        except DamagedMachine as e:
            damaged.append(e)
    return used, damaged


def volume_users(home: Home, name: str) -> list[str]:
    """The machines (names) whose record names volume ``name``, whatever their state;
    VolumeInUse when a record cannot be read (it may name the volume)."""
    from ember.volumes.errors import VolumeInUse

    found, damaged = MachineStore(home).scan()
    users = []
    for m in found:
        try:
            if any(v.name == name for v in volumes_of(m)):
                users.append(m.name)
        except DamagedMachine as e:
            damaged.append(e)
    if damaged:
        raise VolumeInUse(
            f"cannot tell whether machine {damaged[0].machine_id[:12]} uses volume {name}: "
            f"{damaged[0].message}",
            hint=damaged[0].hint,
        )
    return users


def _holds_its_volumes(st: MachineState) -> bool:
    """Whether machine ``st`` has its volumes attached or is about to: not stopped (its
    VMM runs or is being started), or between two runs of its restart policy.  Looked at
    without its lock (whoever holds it may wait for a volume's)."""
    if st.status == mstate.EXITED:
        return restart_pending(st)
    if st.status == mstate.CREATED and st.monitor_pid is None:
        # being made with no monitor named yet (`ember run` names the one it started
        # first): no telling whether it is abandoned, so it holds them
        return True
    return not _monitor_lost(st)


@contextlib.contextmanager
def attaching_volumes(home: Home, st: MachineState, *, make: bool) -> Iterator[list[Path]]:
    """The disks of machine ``st``'s volumes (``make``: made empty for names that have
    none yet, as ``run -v`` does; else VolumeNotFound), under the volumes' locks, which
    stay held while the caller makes its record say that the machine is being started.
    VolumeInUse when another machine holds one (``_holds_its_volumes``): one ext4 mounted
    by two kernels at once is corrupted.  (QEMU's lock on a disk refuses a second VMM
    too, in words less clear.)"""
    from ember.volumes.errors import VolumeInUse
    from ember.volumes.store import Volumes

    wanted = volumes_of(st)
    if not wanted:
        yield []
        return
    names = {v.name for v in wanted}
    with Volumes(home).holding(names) as get:
        for other in MachineStore(home).list():
            if other.id == st.id:
                continue
            try:
                shared = names & {v.name for v in volumes_of(other)}
            except DamagedMachine as e:
                log.warning("%s: not looked at for the volumes it may use", e)
                continue
            if shared and _holds_its_volumes(other):
                state = "restarting" if other.status == mstate.EXITED else other.status
                raise VolumeInUse(
                    f"volume {sorted(shared)[0]} is in use by machine {other.name}, which is "
                    f"{state}",
                    hint=f"stop it first (ember stop {other.name})",
                )
        found = [get(v.name, make) for v in wanted]
        if not make:  # this start attaches them: a copy-up is settled, they are a guest's now
            from ember.snapshots.snapshotter import Snapshotter
            from ember.volumes.copyup import attach

            snap = Snapshotter(home)
            for info in found:
                attach(snap, info)
        yield [info.path for info in found]


#: the longest address an extra host's ``host-gateway`` can become (``check_room``)
_LONGEST_IPV4 = "255.255.255.255"


def _extra_host_entries(extra_hosts: Sequence[str], *, gateway: str) -> tuple[HostEntry, ...]:
    """/etc/hosts lines of ``--add-host`` entries (``NAME:ADDR``), ``host-gateway`` being
    ``gateway``: one line per entry, in order, as docker writes them."""
    from ember.machines.options import HOST_GATEWAY, parse_add_host
    from ember.vm.runconfig import HostEntry

    entries = []
    for entry in extra_hosts:
        host, addr = parse_add_host(entry)
        entries.append(HostEntry(gateway if addr == HOST_GATEWAY else addr, (host,)))
    return tuple(entries)


def extra_hosts_of(st: MachineState) -> tuple[str, ...]:
    """The ``--add-host`` entries of a machine's record (DamagedMachine if malformed)."""
    entries = st.config.get("extra_hosts", [])  # (none in records of older embers)
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise DamagedMachine(st.id, "'config.extra_hosts' must be a list of strings")
    try:
        _extra_host_entries(entries, gateway=_LONGEST_IPV4)
    except InvalidOption as e:
        raise DamagedMachine(st.id, f"'config.extra_hosts': {e.message}") from None
    return tuple(entries)


def boot_run_config(
    rc: RunConfig, machine_id: str, name: str, net: MachineNetwork, extra_hosts: Sequence[str]
) -> RunConfig:
    """The run config a start boots with: ``rc`` (``RUN_CONFIG``) plus this start's
    network: the machine's own /etc/hosts line first, then the ``--add-host`` ones;
    the host's nameservers unless the run named its own (``--dns``)."""
    from ember.vm.runconfig import HostEntry, Interface

    hostname = rc.hostname or machine_id[:12]
    return dataclasses.replace(
        rc,
        hosts=(
            HostEntry(net.guest_ip, (hostname, name)),
            *_extra_host_entries(extra_hosts, gateway=net.gateway),
        ),
        nameservers=rc.nameservers or net.nameservers,
        network=(Interface("eth0", net.guest_ip, net.prefix, net.gateway, net.mtu),),
    )


def _write_boot_config(
    d: Path,
    name: str,
    rc: RunConfig,
    net: MachineNetwork,
    base_initrd: Path,
    extra_hosts: Sequence[str],
    *,
    templated: bool,
) -> None:
    """The machine's run config (``RUN_CONFIG``) with this network in it
    (``boot_run_config``): the initrd it boots with (base + config), and for a machine
    started from a template the config its monitor sends."""
    from ember.vm.initramfs import write_machine_initrd

    rc = boot_run_config(rc, d.name, name, net, extra_hosts)
    write_machine_initrd(base_initrd, rc, d / "initrd.img")
    if templated:
        # the restored NIC keeps the template's MAC unless the config names this one
        macs = (("eth0", net.mac),)
        atomic_write(d / RESTORE_CONFIG, dataclasses.replace(rc, macs=macs).render(), 0o600)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d / RESTORE_CONFIG)


def prepare_start(
    home: Home,
    st: MachineState,
    *,
    restart: bool = False,
    holder: list[socket.socket] | None = None,
    monitor_pid: int | None = None,
) -> MachineState:
    """Make an exited machine ready for its monitor again (``ember start``): a network
    (ports and network name as before; the address may differ), its boot config with that
    network, the exit record cleared.  The root disk and the logs are kept, as docker keeps
    a container's file system and logs across a restart.

    ``restart``: the monitor applying the restart policy, which yields to a user's
    ``ember stop/kill`` that came meanwhile, and to an ``ember start`` that took the
    machine (MachineError); it holds the host ports from their check on (``holder``, see
    ``NetworkManager.setup``).  Not ``restart``: MachineRestarting for a machine whose
    monitor runs it again after its backoff (as docker's start of a restarting
    container, that start has nothing to do), MachineRunning for one being started.

    ``monitor_pid``: the monitor ``ember start`` started for it, named in the record
    from now on: a start killed before it handed the machine over leaves a record whose
    monitor is gone, which ``refresh`` repairs (it was a machine no command could start
    or stop again)."""
    from ember.net.manager import MachineNetwork, NetworkManager
    from ember.snapshots.chain import root_disk
    from ember.snapshots.errors import SnapshotNotFound
    from ember.vm.runconfig import RunConfig

    st = refresh(home, st)
    if not restart:
        _wait_for_ending_monitor(st)
    d = MachineStore(home).dir(st.id)
    with _locked_unless_removed(d, st.name):
        cur = mstate.read_state(d)
        if cur.status == mstate.CREATED and not restart and cur.monitor_pid is None:
            # being created by its `ember run` right now, or left by one that was killed
            # (SIGKILL) before it handed the machine over: which, the record cannot tell,
            # and starting it twice would boot two VMMs on one disk
            raise MachineRunning(
                f"machine {cur.name} is being created by another ember command "
                "(or one was killed before its monitor took the machine)",
                hint=f"if no other ember command is at it, remove it: ember rm -f {cur.name}",
            )
        if cur.status == mstate.CREATED and not restart:  # (its monitor lives: refreshed)
            raise MachineRunning(
                f"machine {cur.name} is being started (by another ember command, or again "
                "by its restart policy)"
            )
        if not restart and restart_pending(cur):
            # its monitor runs it again after its backoff: a second monitor started now
            # would race that one for the machine (and on-failure ran a job again after
            # it had succeeded); docker's start of a restarting container does nothing
            raise MachineRestarting(
                f"machine {cur.name} is restarting (its --restart policy runs it again soon)",
                hint=f"ember restart {cur.name} to run it now",
            )
        if restart and cur.monitor_pid != os.getpid():
            # (only the monitor restarts a machine, and its pid is in the record since its
            # run began): another ember start took the machine meanwhile
            raise MachineError(f"machine {cur.name} was started by another ember command")
        if cur.status != mstate.EXITED:
            raise MachineRunning(f"machine {cur.name} is {cur.status}, not exited")
        if not cur.vm.root_disk:
            # the first record of a `run` killed (SIGKILL) before its create was done,
            # found ended (its monitor gone) by ``refresh``: no disk, network or config
            raise MachineError(
                f"machine {cur.name} was never completely made (the ember run that made "
                "it was killed)",
                hint=f"remove it: ember rm -f {cur.name}",
            )
        if restart and cur.stopped_by_user:
            raise MachineError(f"machine {cur.name} was stopped: not restarting it")
        base = cur.vm.base_initrd
        if base is None or not (d / RUN_CONFIG).is_file():
            raise MachineError(
                f"machine {cur.name} was made by an older ember and cannot be started again",
                hint=f"remove it and run the image anew: ember rm {cur.name}",
            )
        for needed in (base, cur.vm.kernel):  # (a --kernel file may have moved since)
            if not Path(needed).is_file():
                raise MachineError(
                    f"machine {cur.name}'s kernel files are gone ({needed[:200]})",
                    hint=f"remove it and run the image anew: ember rm {cur.name}",
                )
        rc = RunConfig.parse((d / RUN_CONFIG).read_bytes())
        extra_hosts = extra_hosts_of(cur)
        try:
            cur.vm.root_disk = str(root_disk(home, cur.id))
        except SnapshotNotFound:
            raise MachineError(
                f"machine {cur.name}'s root disk is gone",
                hint=f"remove it and run the image anew: ember rm {cur.name}",
            ) from None
        try:
            old = MachineNetwork.from_json(cur.network) if cur.network else None
        except ValueError as e:  # (its types were checked when the record was read)
            raise DamagedMachine(cur.id, f"field 'network': {e}") from None
        # The record first: created, naming the monitor that will run it.  Killed while
        # the network is set up (a start, or a monitor restarting its machine), it names
        # a monitor that is gone, and ``refresh`` frees the network and records the end;
        # the other order left an exited record whose TAP, rules and host ports nothing
        # freed until the machine was started or removed.
        ended = copy.deepcopy(cur)  # put back if this start fails
        # the volumes' check and the record that makes this machine their user, under
        # their locks: two starts (or a start and a run) never both take one
        with attaching_volumes(home, cur, make=False) as volume_disks:
            cur.vm.volume_disks = [str(v) for v in volume_disks]
            cur.previous_exit_code = cur.exit_code if restart else None
            cur.status = mstate.CREATED
            cur.started_at = cur.finished_at = cur.error = cur.end_reason = None
            cur.exit_code = cur.signal = None
            cur.oom_killed = False
            cur.vmm_pid = cur.vmm_start = None
            cur.stopped_by_user = cur.restart_given_up = False
            cur.restarting = restart
            if restart:
                # the same monitor runs it again: `ember stop/kill/rm` see that one is
                # about to start it (its start then ends at once, see _mark_stopped)
                cur.restart_count += 1
            else:
                cur.monitor_pid = monitor_pid
                cur.monitor_start = None if monitor_pid is None else proc_start_time(monitor_pid)
                # as docker start: the policy starts over (on-failure:N's N restarts again)
                cur.restart_count = 0
            mstate.write_state(d, cur)
        manager = NetworkManager(home)
        try:
            manager.teardown(cur.id)  # whatever a crashed monitor left (exited: none runs)
            net = _setup_network(
                home,
                cur.id,
                ports=old.ports if old else (),
                network=old.network if old else "default",
                holder=holder,
            )
            # a template gone since (rebuilt, collected): the machine boots its kernel
            restore = cur.vm.restore
            if restore and not (
                Path(restore).is_file() and Path(cur.vm.restore_initrd or "").is_file()
            ):
                cur.vm.restore = cur.vm.restore_initrd = None
            _write_boot_config(
                d, cur.name, rc, net, Path(base), extra_hosts, templated=bool(cur.vm.restore)
            )
            # the previous run's exit report must not be read as this run's, nor its
            # VMM's last words (vmm.log keeps its first MiB only: over many runs it
            # held none of the last one's)
            machine_channels(d).status_file.write_bytes(b"")
            (d / "vmm.log").write_bytes(b"")
            cur.network = net.to_json()
            mstate.write_state(d, cur)
        except BaseException:
            try:
                _free_network(home, cur)  # before the record says exited again
            finally:
                mstate.write_state(d, ended)
            raise
    return cur


#: how long ``ember start`` waits for the monitor of the machine's last run to end
ENDING_MONITOR_WAIT_S = 30.0


def _wait_for_ending_monitor(st: MachineState) -> None:
    """An exited machine whose monitor is still alive and will not run it again is
    ending: the record says exited before the monitor frees the network and the host
    ports.  `ember restart` (a stop, then a start) went on meanwhile: the old ports read
    as taken, and the old monitor's teardown could remove the new run's TAP and rules.
    Wait for it, as docker's start waits for the container's end to be processed."""
    if st.status == mstate.EXITED and not st.between_restarts and monitor_alive(st):
        assert st.monitor_pid is not None
        wait_pid_exit(st.monitor_pid, ENDING_MONITOR_WAIT_S)


def abandon_start(home: Home, st: MachineState, message: str) -> None:
    """Undo ``prepare_start`` when no monitor took the machine: exited again (125), without
    the network it was given."""
    from ember.net.manager import NetworkManager

    d = MachineStore(home).dir(st.id)
    with contextlib.ExitStack() as locked:
        try:
            locked.enter_context(_locked_unless_removed(d, st.name))
        except MachineNotFound:
            return  # removed meanwhile (rm -f): nothing to undo
        cur = mstate.read_state(d)
        if cur.status != mstate.CREATED or _monitor_of(cur) != _monitor_of(st):
            # found without its monitor since (by `refresh`, which freed the network),
            # and maybe started by another command: that start is not undone
            return
        NetworkManager(home).teardown(st.id)
        cur.record_not_started(message, "its monitor did not take it")
        mstate.write_state(d, cur)


def _monitor_of(st: MachineState) -> tuple[int | None, int | None]:
    """The monitor process the record names (its pid and start time)."""
    return st.monitor_pid, st.monitor_start


def templates_enabled(home: Home) -> bool:
    """``{"templates": {"enabled": false}}`` in config.json or ``EMBER_TEMPLATES=0`` turn
    machine templates off (every machine then boots its kernel)."""
    from ember.config import config_section

    env = os.environ.get("EMBER_TEMPLATES")
    if env is not None:
        return env not in ("0", "false", "no", "off")
    section = config_section(home, "templates", MachineError) or {}
    enabled = section.get("enabled", True)
    if not isinstance(enabled, bool):
        raise MachineError("templates.enabled in config.json must be true or false")
    return enabled


def _template_for(
    home: Home, req: RunRequest, kernel: KernelInfo, base_initrd: Path, accel: str
) -> tuple[Template | None, str | None]:
    """The template this machine can start from, and the key of its shape; when there is
    none yet, one is built in the background for the next machine of the same shape
    (this one boots)."""
    from ember.vm.template import TemplateShape, build_in_background, find_template
    from ember.vm.vmm.qemu import find_qemu

    # own kernel arguments change the boot itself; a kernel without modules has
    # nothing to split between before and after the restore; and the builder's QEMU
    # runs unconfined (docs/machines.md): only a kernel and modules ember installed
    # (Debian's, through apt) may run there, not a --kernel or config.json one
    # a template is restored with the devices it was saved with (one disk): a machine
    # with volumes boots
    if (
        req.kernel_args
        or req.volumes
        or kernel.modules_dir is None
        or not _installed_by_ember(home, kernel)
        or not templates_enabled(home)
    ):
        return None, None
    shape = TemplateShape(
        kernel=kernel.vmlinux, base_initrd=base_initrd, accel=accel,
        # every machine has one NIC (eth0)
        memory_mib=req.memory_mib, cpus=req.cpus, cmdline=(), nics=1,
        vmm_binary=find_qemu(),
    )  # fmt: skip
    found = find_template(home, shape)
    if found is None:
        build_in_background(home, shape)
    return found, shape.key()


def _installed_by_ember(home: Home, kernel: KernelInfo) -> bool:
    """Whether ``kernel`` is one ``ember kernel install`` put under the state directory
    (not a custom one: those are converted under ``kernels/custom``)."""
    installed = home.kernels.resolve()
    paths = [kernel.vmlinux, *([kernel.modules_dir] if kernel.modules_dir else [])]
    return all(
        p.resolve().is_relative_to(installed)
        and not p.resolve().is_relative_to(home.custom_kernels.resolve())
        for p in paths
    )


# ---- the monitor ----------------------------------------------------------------------


@dataclass
class MonitorHandle:
    """A monitor started ahead of its machine: it imports and then waits for the id.

    Starting the monitor first lets its interpreter start-up overlap with
    ``create`` (on the boot's critical path otherwise).  ``sync_r`` carries the
    monitor's JSON-line events; writing the machine id to ``go_w`` hands the
    machine over, closing it unused makes the monitor exit quietly."""

    pid: int
    go_w: int | None
    sync_r: int
    #: where the monitor says why, until it knows its machine (``Home.monitor_log``)
    log: Path | None = None
    #: the monitor has the machine's id: it is the monitor's to start (and clean up) now
    handed: bool = False

    def hand_over(self, st: MachineState) -> None:
        """Give the monitor the machine; ``handed`` says whether it has it, also when an
        interrupt comes (held until ``handed`` is right)."""
        from ember.snapshots.interrupts import deferred

        if self.go_w is None:
            raise MachineError("monitor already handed a machine")
        with deferred():
            try:
                os.write(self.go_w, st.id.encode() + b"\n")
                self.handed = True
            except BrokenPipeError:
                # (not SIGPIPE's silent 141 in main: this is no closed stdout)
                raise MachineError(
                    f"the monitor of machine {st.name} exited before it took the machine",
                    hint=f"what it said is at the end of {self.log}" if self.log else None,
                ) from None
            finally:
                os.close(self.go_w)
                self.go_w = None

    def abandon(self) -> None:
        if self.go_w is not None:
            os.close(self.go_w)
            self.go_w = None
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.sync_r)


def start_monitor(home: Home) -> MonitorHandle:
    """Start a detached monitor (own session) that waits for a machine id."""
    import subprocess

    home.run.mkdir(parents=True, exist_ok=True)
    go_r, go_w = os.pipe()
    sync_r, sync_w = os.pipe()
    argv = [sys.executable, "-m", "ember.machines.monitor", "--home", str(home.root),
            "--go-fd", str(go_r), "--sync-fd", str(sync_w)]  # fmt: skip
    # SIGTERM blocked in the monitor until it has its own handler (``monitor.main``):
    # one that comes while its interpreter starts then stops its machine, as any later
    # one does, instead of killing the monitor (the machine ended "monitor disappeared")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        # until it knows its machine, the monitor logs next to the other runtime files
        with open(home.monitor_log, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                pass_fds=(go_r, sync_w),
                close_fds=True,
            )
    except BaseException:
        for fd in (go_w, sync_r):
            os.close(fd)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(go_r)
        os.close(sync_w)
    # the monitor outlives us; nobody needs to reap it here
    proc.returncode = 0
    return MonitorHandle(proc.pid, go_w, sync_r, log=home.monitor_log)


def _proc_mentions(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle.encode() in f.read()
    except OSError:
        return False


def monitor_alive(st: MachineState) -> bool:
    if st.monitor_pid is None or not pid_alive(st.monitor_pid):
        return False
    return st.monitor_start is not None and proc_start_time(st.monitor_pid) == st.monitor_start


def restart_pending(st: MachineState) -> bool:
    """Between two runs of its --restart policy: exited with its monitor waiting to run
    it, or being started again by that monitor."""
    return st.between_restarts and monitor_alive(st)


def vmm_alive(st: MachineState) -> bool:
    """Whether the machine's VMM runs: its pid with the start time recorded for it (a
    record from before start times: the pid's command line naming the machine, which
    a QEMU a guest escaped into can rewrite, and then was neither killed by `ember
    kill` / `rm -f` nor seen as running)."""
    if st.vmm_pid is None or not pid_alive(st.vmm_pid):
        return False
    if st.vmm_start is not None:
        return proc_start_time(st.vmm_pid) == st.vmm_start
    return _proc_mentions(st.vmm_pid, st.id[:12])


def _monitor_lost(st: MachineState) -> bool:
    """A ``running`` record, or one its monitor is starting again (``--restart``), whose
    monitor is gone."""
    has_monitor = st.status == mstate.RUNNING or (
        st.status == mstate.CREATED and st.monitor_pid is not None
    )
    return has_monitor and not monitor_alive(st)


def _setup_network(
    home: Home,
    machine_id: str,
    *,
    ports: Sequence[PortMapping],
    network: str,
    holder: list[socket.socket] | None = None,
) -> MachineNetwork:
    """``NetworkManager.setup``, tried once more when a port or the subnet was taken and
    machines whose monitor is gone (a host reboot, a monitor killed) were holding
    network: their records are repaired first, which frees it.  Without this, after a
    reboot a run refused the old machines' ports until some command (ps) looked at them.
    After a reboot they are repaired before the first set-up in any case: it rewrote
    the ruleset with their DNAT rules, on ports host programs may have taken since."""
    from ember.net.errors import PortConflict, SubnetExhausted
    from ember.net.manager import NetworkManager

    manager = NetworkManager(home)

    def repair_lost() -> bool:
        lost = [m for m in MachineStore(home).list() if m.id != machine_id and _monitor_lost(m)]
        for m in lost:
            refresh(home, m)
        orphans = free_orphaned_networks(home, keep=machine_id)
        return bool(lost or orphans)

    if manager.allocated_before_this_boot():
        repair_lost()  # their rules would be applied again with this machine's
    try:
        return manager.setup(machine_id, ports=ports, network=network, holder=holder)
    except (PortConflict, SubnetExhausted):
        if not repair_lost():
            raise
    return manager.setup(machine_id, ports=ports, network=network, holder=holder)


def free_orphaned_networks(
    home: Home, *, keep: str | None = None, dry_run: bool = False
) -> list[str]:
    """Free the network allocations of machines that no longer exist (a removal that
    could not free a machine's network deleted the rest): their TAPs, their rules (a
    published port's DNAT took a host program's traffic to an address nothing holds)
    and their host ports; nothing else ever frees them.  ``keep``: a machine id left
    alone whatever (the one the caller is setting up).  The machine ids freed (or, with
    ``dry_run``, that would be)."""
    from ember.net.manager import NetworkManager

    manager = NetworkManager(home)
    # first: a machine's directory is made before its network, and removed after it
    allocated = set(manager.machines())
    orphans = sorted(allocated - set(MachineStore(home).ids()) - {keep})
    for gone in orphans:
        if not dry_run:
            log.info("freeing the network of machine %s, which no longer exists", gone[:12])
            manager.teardown(gone)
    return orphans


def _free_network(home: Home, st: MachineState) -> None:
    """Tear a machine's network down before its record says exited: killed in between,
    the record still names a dead monitor, and the next refresh frees it again (the other
    order left an exited record whose TAP, rules and host ports nothing freed until the
    machine was started or removed).  A failure is said, and the end recorded anyway."""
    from ember.net.manager import NetworkManager

    try:
        NetworkManager(home).teardown(st.id)
    except EmberError as e:
        log.warning("cannot free machine %s's network: %s", st.name, e)


def refresh(home: Home, st: MachineState) -> MachineState:
    """Repair a record whose monitor is gone (killed, host crash); a ``--rm`` machine's
    is then removed (the one that says it ended too: its monitor died before removing
    it)."""
    if not (_monitor_lost(st) or _removal_lost(st)):
        return st
    d = MachineStore(home).dir(st.id)
    try:
        with _locked_unless_removed(d, st.name):
            cur = mstate.read_state(d)
            if _monitor_lost(cur):
                _record_lost(home, d, cur)
            elif not _removal_lost(cur):
                return cur
    except MachineNotFound:
        # removed meanwhile (another command repaired and removed a --rm one first): as
        # it was; what a caller does with it next finds it gone and says so
        return st
    if cur.auto_remove:
        # --rm: what its monitor would have done had it lived (and its `ember run`, had
        # that not been killed too), as dockerd removes such containers when it comes
        # back; only the process that marked it ended gets here, or, for one that was
        # marked ended, whoever finds it first (the others find it gone)
        try:
            mstate.record_removed_exit(home.run, cur)
            _release_and_delete(home, cur.id, cur.name)
        except (EmberError, OSError) as e:
            log.warning("cannot remove --rm machine %s whose monitor is gone: %s", cur.name, e)
    return cur


def _removal_lost(st: MachineState) -> bool:
    """A ``--rm`` machine that ended, whose monitor is gone without removing it (killed
    between recording the end and the removal, or the removal failed)."""
    return (
        st.auto_remove and st.status == mstate.EXITED and st.monitor_pid is not None
        and not monitor_alive(st)
    )  # fmt: skip


def _record_lost(home: Home, d: Path, cur: MachineState) -> None:
    """Record the end of a run whose monitor is gone (under the machine's lock)."""
    if vmm_alive(cur) and cur.vmm_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(cur.vmm_pid, signal.SIGKILL)
    _free_network(home, cur)
    cur.status, cur.restarting = mstate.EXITED, False
    cur.finished_at = cur.finished_at or mstate.now()
    if cur.exit_code is None:
        cur.exit_code = 255
        cur.end_reason = "the machine's monitor disappeared"
    mstate.write_state(d, cur)


# ---- control --------------------------------------------------------------------------


def _require_running(home: Home, st: MachineState) -> MachineState:
    st = refresh(home, st)
    if st.status != mstate.RUNNING:
        raise _not_running(st)
    return st


def _not_running(st: MachineState) -> MachineNotRunning:
    if restart_pending(st):
        # as docker: a signal cannot reach a program that is not there between two runs
        return MachineNotRunning(
            f"machine {st.name} is restarting (its --restart policy runs it again soon)",
            hint=f"wait until it runs, or ember stop {st.name}",
        )
    return MachineNotRunning(f"machine {st.name} is not running ({st.status})")


def wait_exited(home: Home, st: MachineState, timeout: float | None) -> MachineState | None:
    """Wait until the monitor has recorded the end; the final state, or None on timeout."""
    d = MachineStore(home).dir(st.id)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            cur = refresh(home, mstate.read_state(d))
        except FileNotFoundError:
            return st  # removed (--rm) after it ended
        if cur.status == mstate.EXITED:
            return cur
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return None
        if cur.monitor_pid is not None:
            wait_pid_exit(cur.monitor_pid, min(left, 0.5) if left is not None else 0.5)
        else:
            time.sleep(0.05)


def mark_stopped_by_user(home: Home, st: MachineState) -> MachineState:
    """Record that the user is ending the machine: its restart policy does not apply.
    MachineNotFound when it is gone (a --rm machine that ended meanwhile)."""
    d = MachineStore(home).dir(st.id)
    with _locked_unless_removed(d, st.name):
        cur = mstate.read_state(d)
        cur.stopped_by_user = True
        mstate.write_state(d, cur)
    return cur


def _stop_pending_restart(home: Home, st: MachineState) -> MachineState | None:
    """For ``remove``: a machine between two runs of its restart policy (exited, or being
    started again by its monitor), or one `ember start` is starting: marked stopped, its
    monitor waited for (it then does not restart it, or kills the VMM it was starting);
    None when it is not such a machine, or is running by now (``remove`` refuses it, or
    kills its VMM under ``-f``).  MachineNotFound when it was removed meanwhile."""
    st = refresh(home, st)
    if st.status == mstate.RUNNING or not _monitor_runs_it_again(st):
        return None  # (looked at without the lock, to take it only when it may be needed)
    try:
        cur, _ = _mark_stopped(home, st, running=False)
    except MachineNotRunning:
        return None  # running by now, or its monitor gone
    return _after_its_monitor(home, cur)


def _monitor_runs_it_again(st: MachineState) -> bool:
    """Not running, and its monitor is alive to run it (again): between two runs of its
    restart policy, or being started (an exited machine without policy: its monitor is
    ending)."""
    if st.status == mstate.EXITED and st.restart_policy == "no":
        return False
    return monitor_alive(st)


def _after_its_monitor(home: Home, st: MachineState) -> MachineState:
    """The record once the monitor told (by the record) not to run the machine again
    has ended (``st`` when that monitor removed it: --rm)."""
    if st.monitor_pid is not None:
        wait_pid_exit(st.monitor_pid, 30)
    try:
        return mstate.read_state(MachineStore(home).dir(st.id))
    except FileNotFoundError:
        return st


def _mark_stopped(
    home: Home, st: MachineState, *, running: bool = True, between_runs: bool = True
) -> tuple[MachineState, bool]:
    """Mark the machine stopped by the user (its restart policy does not run it again) in
    one step, under its lock, with the look that decides what to do: a stop that looked
    at it between two runs of its restart policy, then found its next run begun, took it
    for not running and marked nothing, and the policy went on running it.

    Returns the marked record, and True for a running machine (the guest is to be told)
    or False for one its monitor is to run (again) and now will not (wait for the
    monitor).  MachineNotRunning for any other, and with ``running`` (``between_runs``)
    False for the former (the latter) too: then left unmarked."""
    st = refresh(home, st)
    d = MachineStore(home).dir(st.id)
    with _locked_unless_removed(d, st.name):
        cur = mstate.read_state(d)
        is_running = cur.status == mstate.RUNNING
        if not (running if is_running else between_runs and _monitor_runs_it_again(cur)):
            raise _not_running(cur)
        cur.stopped_by_user = True
        mstate.write_state(d, cur)
    return cur, is_running


@dataclass
class StopRequested:
    """A graceful stop asked of a running machine, or of one being started
    (``request_stop``)."""

    #: the machine's record, marked stopped by the user
    machine: MachineState
    #: the stop timeout the guest was given: it SIGKILLs the program after it (None: never)
    timeout: int | None
    #: the connection the stop went out on, open for a ``kill`` after it; None when the
    #: control channel could not be reached or written (the machine may be ending), or
    #: when the machine was not running yet (``failure`` None then: it was only marked)
    conn: socket.socket | None
    #: why ``conn`` is None
    failure: ControlChannelError | None = None

    @property
    def kill_after(self) -> float | None:
        """Seconds after the request past which a machine that still runs gets its VMM
        killed from the host: the guest had its timeout, then ``KILL_GRACE`` to end the
        program and report (None: no timeout)."""
        return None if self.timeout is None else self.timeout + KILL_GRACE

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> StopRequested:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request_stop(
    home: Home, st: MachineState, timeout: int | None, *, starting: bool = False
) -> StopRequested:
    """Ask running machine ``st`` to stop: marked stopped by the user (its restart policy
    does not apply), then the guest told to send the StopSignal and to SIGKILL the program
    after ``timeout`` seconds (None: never).  MachineNotRunning when it is not running
    (any more); a control channel that cannot be reached is the result's ``failure``.

    ``starting``: a machine its monitor is starting (or runs again after a backoff) is
    marked too, and so ends before its program runs: the result has neither a
    connection nor a failure then."""
    request = stop_request(timeout)  # (a bad timeout fails before anything is done)
    st, running = _mark_stopped(home, st, between_runs=starting)
    if not running:
        return StopRequested(st, timeout, None)
    return _send_stop(home, st, timeout, request)


def _send_stop(
    home: Home, st: MachineState, timeout: int | None, request: bytes
) -> StopRequested:
    """Send ``request`` (``stop_request``) to the running machine's guest."""
    try:
        conn = open_control(machine_channels(MachineStore(home).dir(st.id)).control_socket)
    except ControlChannelError as e:
        return StopRequested(st, timeout, None, e)
    try:
        write_control(conn, request)
    except ControlChannelError as e:
        conn.close()
        return StopRequested(st, timeout, None, e)
    return StopRequested(st, timeout, conn)


def stop(home: Home, st: MachineState, timeout: int | None = DEFAULT_STOP_TIMEOUT) -> MachineState:
    """Graceful stop: the guest sends the StopSignal; after ``timeout`` seconds the program
    is SIGKILLed by the guest's init, and if the guest still does not end, the VMM is.
    ``timeout`` None: no SIGKILL, wait as long as the program takes (``docker stop -t -1``).
    A machine between two runs of its restart policy is not run again.  A paused one
    runs on once the request is queued (as docker stops a paused container)."""
    request = stop_request(timeout)  # (a bad timeout fails before anything is done)
    st, running = _mark_stopped(home, st)
    if not running:
        return _after_its_monitor(home, st)
    with _send_stop(home, st, timeout, request) as asked:
        _resume_if_paused(home, st)
        if asked.conn is None:
            # nothing reached the guest: no end to wait for ever for
            end = wait_exited(home, st, KILL_GRACE if timeout is None else timeout)
            return end if end is not None else kill_vmm(home, st)
        end = wait_exited(home, st, timeout)
        if end is not None:
            return end
        with contextlib.suppress(ControlChannelError):
            write_control(asked.conn, KILL_REQUEST)
        end = wait_exited(home, st, KILL_GRACE)
        return end if end is not None else kill_vmm(home, st)


def kill(home: Home, st: MachineState) -> MachineState:
    """SIGKILL the program (through the guest, so its exit report comes back), else the
    VMM.  A machine between two runs of its restart policy is not run again.  A paused
    one runs on once the request is queued (as docker kills a paused container)."""
    st, running = _mark_stopped(home, st)
    if not running:
        return _after_its_monitor(home, st)
    d = MachineStore(home).dir(st.id)
    try:
        conn = open_control(machine_channels(d).control_socket)
    except ControlChannelError:
        return kill_vmm(home, st)
    try:
        write_control(conn, KILL_REQUEST)
        _resume_if_paused(home, st)
        end = wait_exited(home, st, KILL_GRACE)
    except ControlChannelError:
        end = None
    finally:
        conn.close()
    return end if end is not None else kill_vmm(home, st)


def send_signal(home: Home, st: MachineState, signo: int) -> None:
    """``ember kill -s SIG`` (not KILL): ember-init delivers ``signo`` to the program;
    like docker kill, this does not wait for any effect.  A paused machine stays paused:
    the guest takes the signal when it runs on, as docker queues it."""
    st = _require_running(home, st)
    try:
        conn = open_control(machine_channels(MachineStore(home).dir(st.id)).control_socket)
        try:
            # the monitor serves control.sock and passes the line on over its own
            # connection to the guest: hanging up right after writing loses nothing
            write_control(conn, signal_request(signo))
        finally:
            conn.close()
    except ControlChannelError:
        # The machine was ending: its monitor takes the channel away before it records
        # the end.  Say that (as for any machine not running), not the socket's errno.
        if wait_exited(home, st, CHANNEL_GONE_GRACE) is not None:
            raise MachineNotRunning(f"machine {st.name} is not running (exited)") from None
        raise


#: how long a machine whose control channel is gone may take to be recorded as ended
CHANNEL_GONE_GRACE = 2.0


def _resume_if_paused(home: Home, st: MachineState) -> None:
    """Let machine ``st`` run on if its current run is paused (a stop or kill is queued)."""
    d = MachineStore(home).dir(st.id)
    if (d / mpause.MARKER).exists():  # (the record read again only then)
        cur = refresh(home, st)
        if mpause.is_paused(d, cur) and cur.vmm_pid is not None:
            mpause.resume(d, cur.vmm_pid)


def pause(home: Home, st: MachineState) -> None:
    """``ember pause``: freeze running machine ``st`` whole (its VMM stopped)."""
    st = _require_running(home, st)
    if not vmm_alive(st):
        raise MachineNotRunning(f"machine {st.name} is not running (its VMM is gone)")
    mpause.pause(MachineStore(home).dir(st.id), st)


def unpause(home: Home, st: MachineState) -> None:
    """``ember unpause``: let paused machine ``st`` run on."""
    st = _require_running(home, st)
    mpause.unpause(MachineStore(home).dir(st.id), st)


def kill_vmm(home: Home, st: MachineState, *, wait: bool = True) -> MachineState:
    """Kill the VMM process itself; the monitor records the end (exit code 137).  A
    machine removed meanwhile (--rm, ended) is ended: its record as last seen.
    ``wait``: for the monitor to record the end (else the record as marked: an attached
    run goes on reading the logs meanwhile, which the monitor's last drain waits for)."""
    try:
        cur = mark_stopped_by_user(home, st)
    except MachineNotFound:
        return st
    if cur.vmm_pid is not None and vmm_alive(cur):
        with contextlib.suppress(ProcessLookupError):
            os.kill(cur.vmm_pid, signal.SIGKILL)
    if not wait:
        return cur
    end = wait_exited(home, cur, 30)
    if end is None:
        raise MachineError(f"machine {cur.name} did not end after its VMM was killed")
    return end


def remove_damaged(home: Home, machine_id: str) -> None:
    """``ember rm -f`` of a machine whose record cannot be read: kill its VMM if one
    still runs (found by the ``-name ember-ID`` its command line carries), then
    release its network and root disk and delete it."""
    needle = f"ember-{machine_id}"
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _proc_mentions(int(entry), needle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
    _release_and_delete(home, machine_id, machine_id[:12])


def rename(home: Home, st: MachineState, new_name: str) -> None:
    """Give machine ``st`` the name ``new_name`` (docker rename), running or not.  The
    guest sees it at its next start (its /etc/hosts line names the machine)."""
    if new_name == st.name:
        raise InvalidOption(f"machine {st.name} is already named {new_name!r}")
    store = MachineStore(home)
    d = store.dir(st.id)
    # (the machine's lock first: waiting for it, a start under way, with the names lock
    # held would stall every `ember run` meanwhile)
    with _locked_unless_removed(d, st.name), store.name_free(new_name, st.id):
        cur = mstate.read_state(d)
        cur.name = new_name
        mstate.write_state(d, cur)


def remove(
    home: Home, st: MachineState, *, force: bool = False, notice: Notice | None = None,
    _retries: int = 2,
) -> None:
    """Delete a machine: its root disk, network, logs and record.  One another command is
    still creating (``ember run`` making its disk and network) is refused, or with
    ``force`` removed once that command is done with it (``notice``: told when it waits);
    one being started is stopped first (its monitor kills the VMM it was starting)."""
    d = MachineStore(home).dir(st.id)
    if st.status == mstate.CREATED and is_held(d / mstate.CREATING):
        if not force:
            raise MachineRunning(
                f"machine {st.name} is being created by another ember command",
                hint="wait for it, or use ember rm -f to stop and remove it once it is made",
            )
        # waits for that create to end; a lock that cannot be opened (gone with an undone
        # create, or a symlink put in its place) waits for nothing
        with contextlib.suppress(OSError), mstate.creating(d, notice=notice):
            pass
        try:
            st = MachineStore(home).find(st.id)
        except MachineNotFound:
            return  # its create failed and undid it
    if not force and restart_pending(refresh(home, st)):
        # as docker rm: its policy would run it again any moment; say so, not delete it
        raise MachineRunning(
            f"machine {st.name} is restarting (its --restart policy runs it again soon)",
            hint=f"ember stop {st.name} first, or use ember rm -f",
        )
    try:
        ended = _stop_pending_restart(home, st)
    except MachineNotFound:
        return  # removed by another command (or its --rm monitor) meanwhile
    st = ended or refresh(home, st)
    if st.status == mstate.RUNNING:
        if not force:
            raise MachineRunning(
                f"machine {st.name} is running", hint="stop it first or use ember rm -f"
            )
        st = ended = kill_vmm(home, st)
    if ended is not None and ended.status == mstate.EXITED:
        # for an `ember wait` on it (docker wait prints 137 for a container rm -f
        # killed; one being started ends as it starts): its exit code outlives it a
        # while, as a --rm machine's does
        try:
            mstate.record_removed_exit(home.run, ended)
        except OSError as e:
            log.warning("cannot keep machine %s's exit code: %s", st.name, e)
    # Under the machine's lock, which `ember start` holds while it sets the machine up:
    # one that took the machine since it was looked at above (a network, a new monitor)
    # must not have it freed under it.  That start then finds it gone.
    with contextlib.ExitStack() as locked:
        try:
            locked.enter_context(_locked_unless_removed(d, st.name))
            cur = mstate.read_state(d)
        except (MachineNotFound, FileNotFoundError):
            return  # removed by another command meanwhile
        if _run_of(cur) == _run_of(st):
            _release_and_delete(home, st.id, st.name)
            return
    if not force or _retries <= 0:
        raise MachineRunning(
            f"machine {st.name} was started by another ember command meanwhile",
            hint=f"stop it first or use ember rm -f {st.name}",
        )
    remove(home, cur, force=True, notice=notice, _retries=_retries - 1)


@contextlib.contextmanager
def _locked_unless_removed(d: Path, name: str) -> Iterator[None]:
    """Inside the machine's lock; MachineNotFound when the machine was removed while
    this waited for it (``remove`` deletes it under that lock)."""
    lock = mstate.locked(d)
    try:
        # (removed while this waited: the lock granted is in the directory ``remove_dir``
        # renamed away, which FileLock finds by its name and gives up, FileNotFoundError)
        lock.acquire()
    except FileNotFoundError:
        raise MachineNotFound(f"machine {name} was removed meanwhile") from None
    try:
        yield
    finally:
        lock.release()


def _run_of(st: MachineState) -> tuple[object, ...]:
    """What a start or a run changes in a record."""
    return st.status, st.monitor_pid, st.vmm_pid, st.started_at


def _release_and_delete(home: Home, machine_id: str, shown: str) -> None:
    """Free a stopped machine's network and root disk (both named by its id), then
    delete its directory; each step is tried, the failures reported together."""
    from ember.net.manager import NetworkManager
    from ember.snapshots.chain import release_root_disk

    errors: list[str] = []
    for step in (
        lambda: NetworkManager(home).teardown(machine_id),
        lambda: release_root_disk(home, machine_id),
    ):
        try:
            step()
        except EmberError as e:
            errors.append(str(e))
    if errors:
        raise MachineError(f"machine {shown} was only partly removed: {'; '.join(errors)}")
    MachineStore(home).remove_dir(machine_id)
