"""QEMU's ``microvm`` machine as an ember VMM.

``qemu_argv`` renders the command line (pure, tested); ``QemuVM`` spawns and
controls the process.  Choices, measured on this host (docs/machines.md):

- the uncompressed ELF ``vmlinux`` is booted through the PVH entry with
  ``-cpu max`` under TCG (the bzImage spends seconds in its xz decompressor
  under emulation; the bzImage also hangs with ``-cpu max``, so it gets the
  default CPU model);
- under TCG the guest's early TSC calibration against the PIT fails now and then
  on a loaded host and the boot hangs before the console comes up (about 1 in 5
  boots here); ``tsc_early_khz=`` with the host's TSC rate skips that calibration
  (15/15 boots fine).  Under KVM the guest gets kvmclock and needs nothing;
- ``-no-reboot``: a guest reboot or poweroff ends the QEMU process, which is how
  the host learns the machine is over; ``panic=-1`` turns a guest panic into one;
- every device is virtio-mmio (microvm has no PCI): virtio-blk root disk,
  virtio-net on a TAP, virtio-serial ports for the guest channel contract;
- the console and the output ports are ``file`` chardevs on the channel paths,
  which may be FIFOs (ember's monitor reads them to keep the logs capped): QEMU
  opens a FIFO like a file, and while it is full QEMU stops taking the guest's
  port output (back-pressure, no loss);
- a machine's QEMU is confined (``ember.vm.vmm.jail``): it never runs as root, it
  inherits every file, socket and TAP as a descriptor the monitor opened
  (``Inherited``, ``QemuVM.start``), and it runs under ``-sandbox``, which forbids it
  to fork or exec: so a restore reads its saved state from an inherited descriptor
  (``-incoming fd:N``), not from a ``cat`` QEMU would spawn.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ember.process import wait_pid_exit
from ember.vm.vmm.base import (
    PORT_EXEC,
    VM,
    VMM,
    Disk,
    VMExit,
    VMSpec,
    listen_unix,
)
from ember.vm.vmm.errors import VMMError, VMMNotInstalled
from ember.vm.vmm.jail import (
    SANDBOX,
    Identity,
    IdentityLease,
    can_confine,
    close_all,
    enter,
    kvm_group,
    lease_identity,
    loop_mounts,
    readable_copy,
)

QEMU_BINARY = "qemu-system-x86_64"
ELF_MAGIC = b"\x7fELF"

#: virtio-serial port names of the guest channel contract
PORT_STDOUT = "org.ember.stdout"
PORT_STDERR = "org.ember.stderr"
PORT_STATUS = "org.ember.status"
PORT_CONTROL = "org.ember.control"
#: x86's COMMAND_LINE_SIZE (2048) less its NUL: a longer command line hangs the guest
#: before its console comes up (no message at all)
MAX_CMDLINE = 2047

#: all of the environment a VMM gets
VMM_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def _escape(value: str) -> str:
    """QEMU option values separate fields with ``,``; a literal comma is written ``,,``."""
    return value.replace(",", ",,")


def is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ELF_MAGIC


def tsc_khz_of(cpuinfo: str) -> int | None:
    """The TSC rate in kHz that ``/proc/cpuinfo`` text gives, when the TSC is constant
    (else None: a rate that changes with the clock cannot be handed to a guest)."""
    mhz = flags = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                return None
        elif key == "flags" and flags is None:
            flags = value.split()
        if mhz is not None and flags is not None:
            break
    if mhz is None or not flags or "constant_tsc" not in flags or mhz <= 0:
        return None
    return int(round(mhz * 1000))


@lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz (under TCG the guest's TSC ticks at the host's rate),
    or None.  The guest kernel's own calibration against the emulated PIT fails at
    random under TCG, and the boot then hangs after "Marking TSC unstable"; given the
    rate (tsc_early_khz), it does not calibrate (docs/guest.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            return tsc_khz_of(f.read())
    except OSError:
        return None


def kernel_cmdline(accel: str, extra: Sequence[str] = (), *, tsc_khz: int | None) -> str:
    """The guest kernel's command line: console on the first serial port (ember-init's
    messages, the machine's log), a panic ends the VM (QEMU runs with -no-reboot), a
    quiet boot (each console byte is an emulated I/O under TCG), then ``extra``."""
    args = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4"]
    if accel == "tcg" and tsc_khz:
        args.append(f"tsc_early_khz={tsc_khz}")
    args += list(extra)
    for a in args:
        if "\n" in a or "\x00" in a:
            raise VMMError(f"invalid kernel argument {a!r}")
    cmdline = " ".join(args)
    if len(cmdline.encode()) > MAX_CMDLINE:
        raise VMMError(
            f"the guest kernel command line is {len(cmdline.encode())} bytes, "
            f"more than the {MAX_CMDLINE} the kernel takes"
        )
    return cmdline


@dataclass(frozen=True)
class Inherited:
    """What a confined QEMU inherits instead of opening paths: descriptor numbers, the
    same in the child (``pass_fds``).  Each was opened by the monitor, as root."""

    kernel: int
    initrd: int | None
    console: int
    stdout: int
    stderr: int
    status: int
    #: a unix socket bound and listening at the control socket's path
    control: int
    #: the same for each exec port
    execs: tuple[int, ...]
    #: per disk: read-write and read-only descriptors (QEMU's block layer opens it both
    #: ways), or a read-only one alone for a read-only disk
    disks: tuple[tuple[int, ...], ...]
    #: per NIC: its TAP, attached (None: no host side), and a vhost-net descriptor
    taps: tuple[int | None, ...]
    vhost: tuple[int | None, ...]
    #: the saved state a restore starts from
    restore: int | None


class _FdSets:
    """``-add-fd`` sets: QEMU opens ``/dev/fdset/N`` by dup'ing the descriptor of set N
    whose access mode is the one it asks for."""

    def __init__(self) -> None:
        self._next = 1

    def add(self, fds: tuple[int, ...]) -> tuple[list[str], str]:
        """The options that make set N of ``fds``, and the path that names it."""
        n, self._next = self._next, self._next + 1
        options = [a for fd in fds for a in ("-add-fd", f"fd={fd},set={n}")]
        return options, f"/dev/fdset/{n}"


def _proc_fd(fd: int) -> str:
    # QEMU reads the kernel and initrd by path only; this one reopens the inherited
    # file (the kernel checks the file's own mode bits, not the directories above it)
    return f"/proc/self/fd/{fd}"


def _file_chardev(cid: str, path: Path, fd: int | None, sets: _FdSets) -> list[str]:
    options, name = ([], str(path)) if fd is None else sets.add((fd,))
    return [*options, "-chardev", f"file,id={cid},path={_escape(name)},append=on"]


def _drive(i: int, disk: Disk, fds: tuple[int, ...] | None, sets: _FdSets) -> list[str]:
    options, name = ([], str(disk.path)) if fds is None else sets.add(fds)
    drive = f"id=disk{i},file={_escape(name)},format=raw,if=none,discard=unmap"
    if disk.read_only:
        drive += ",readonly=on"
    return [*options, "-drive", drive, "-device", f"virtio-blk-device,drive=disk{i}"]


def _netdev(i: int, tap: str, vhost: bool, fds: Inherited | None) -> str:
    if not tap:
        # no host side (a template being built): a hub port with nobody else on it
        return f"hubport,id=net{i},hubid={i}"
    if fds is None:
        netdev = f"tap,id=net{i},ifname={_escape(tap)},script=no,downscript=no"
        return netdev + (",vhost=on" if vhost else "")
    # an attached TAP: QEMU runs no script and opens nothing (it may not: fd= excludes
    # ifname=, script= and downscript=)
    netdev = f"tap,id=net{i},fd={fds.taps[i]}"
    vhost_fd = fds.vhost[i]
    return netdev + (f",vhost=on,vhostfd={vhost_fd}" if vhost_fd is not None else "")


def qemu_argv(
    spec: VMSpec,
    *,
    binary: str = QEMU_BINARY,
    kernel_is_elf: bool = True,
    tsc_khz: int | None = None,
    vhost: bool = False,
    fds: Inherited | None = None,
) -> list[str]:
    """The QEMU command line for ``spec`` (pure: no file system access).

    With ``fds`` (a machine's confined QEMU, ``QemuVM.start``) QEMU runs under its
    seccomp filter and every file, socket and TAP is one of those descriptors; without,
    QEMU opens the paths itself (the template builder: it runs no tenant code)."""
    ch = spec.channels
    sets = _FdSets()
    machine = "microvm,x-option-roms=off,isa-serial=on"
    argv = [binary, "-name", _escape(f"ember-{spec.name}"), "-M", machine]
    if fds is not None:
        argv += ["-sandbox", SANDBOX]
    if spec.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        # -cpu max is what the PVH (ELF) path needs under TCG; a bzImage hangs with it
        argv += ["-accel", "tcg", "-cpu", "max" if kernel_is_elf else "qemu64"]
    argv += [
        "-m", str(spec.memory_mib),
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-msg", "timestamp=on",
        "-kernel", str(spec.kernel) if fds is None else _proc_fd(fds.kernel),
    ]  # fmt: skip
    if spec.initrd is not None:
        initrd_fd = None if fds is None else fds.initrd
        argv += ["-initrd", str(spec.initrd) if initrd_fd is None else _proc_fd(initrd_fd)]
    argv += ["-append", kernel_cmdline(spec.accel, spec.cmdline, tsc_khz=tsc_khz)]
    argv += _file_chardev("console", ch.console_log, None if fds is None else fds.console, sets)
    argv += ["-serial", "chardev:console"]
    for i, disk in enumerate(spec.disks):
        argv += _drive(i, disk, None if fds is None else fds.disks[i], sets)
    for i, nic in enumerate(spec.nics):
        argv += ["-netdev", _netdev(i, nic.tap, vhost, fds)]
        argv += ["-device", f"virtio-net-device,netdev=net{i},mac={nic.mac}"]
    argv += ["-device", "virtio-serial-device,max_ports=16"]
    for cid, port, path, attr in (
        ("out", PORT_STDOUT, ch.stdout_log, "stdout"),
        ("err", PORT_STDERR, ch.stderr_log, "stderr"),
        ("status", PORT_STATUS, ch.status_file, "status"),
    ):
        argv += _file_chardev(cid, path, None if fds is None else getattr(fds, attr), sets)
        argv += ["-device", f"virtserialport,chardev={cid},name={port}"]
    if fds is None:
        # the socket is named relative to the VMM's working directory (the template
        # builder runs QEMU in its parent): an absolute path under a deep state dir can
        # exceed the 107 bytes a unix socket address holds
        control = f"socket,id=control,path={_escape(ch.control_socket.name)},server=on,wait=off"
    else:
        control = f"socket,id=control,fd={fds.control},server=on,wait=off"
    argv += ["-chardev", control, "-device", f"virtserialport,chardev=control,name={PORT_CONTROL}"]
    for n, path in enumerate(ch.exec_sockets):
        # one session each; its client (`ember exec`) talks to ember-init directly
        where = f"path={_escape(path.name)}" if fds is None else f"fd={fds.execs[n]}"
        argv += ["-chardev", f"socket,id=exec{n},{where},server=on,wait=off",
                 "-device", f"virtserialport,chardev=exec{n},name={PORT_EXEC}{n}"]  # fmt: skip
    if spec.restore is not None:
        # start from a saved state (a template) instead of booting; the devices above
        # must be those the state was saved with
        if fds is None or fds.restore is None:
            raise VMMError("a restore reads its saved state from an inherited descriptor")
        argv += ["-incoming", f"fd:{fds.restore}"]
    return argv


# linux/if_tun.h: what QEMU's own tap_open asks for (a virtio-net header on each frame)
_TUNSETIFF = 0x400454CA
_TUNSETVNETHDRSZ = 0x400454D8
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_VIRTIO_NET_HDR_LEN = 10


def _attach_tap(name: str) -> int:
    """A descriptor of TAP ``name`` (which the network set-up made), attached as QEMU
    attaches it; QEMU could not: attaching to a TAP another uid owns takes CAP_NET_ADMIN."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifreq = struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, ifreq.ljust(40, b"\0"))
        fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", _VIRTIO_NET_HDR_LEN))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_channel(path: Path) -> int:
    """A log channel (a file, or a FIFO the monitor reads), opened as QEMU would open it:
    appending and blocking (a full FIFO holds the guest's output back, see above).
    O_NONBLOCK only for the open: a FIFO nobody reads is an error, not a hang."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise VMMError(f"nobody reads the FIFO {path}") from None
        raise
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def _listen_control(path: Path) -> int:
    """The control socket, bound and listening (QEMU's uid may not create a file in the
    machine's directory); QEMU serves one client and queues one more, as on its own."""
    return listen_unix(path, 1).detach()


def _open_disk(disk: Disk) -> tuple[int, ...]:
    if disk.read_only:
        return (_open_ro(disk.path),)
    rw = os.open(disk.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        return rw, _open_ro(disk.path)
    except BaseException:
        os.close(rw)
        raise


def open_readable(path: Path, identity: Identity | None) -> int:
    """A descriptor of ``path`` for QEMU to read through ``/proc/self/fd``: the file
    itself, or a copy in memory when its mode keeps ``identity`` out (a machine's
    initrd is root's and 0600: it holds the run config).  The kernel and a template's
    initrd are readable by all: nothing is copied for them."""
    fd = _open_ro(path)
    if identity is None or identity.can_read(os.fstat(fd)):
        return fd
    try:
        return readable_copy(fd, path.name)
    finally:
        os.close(fd)


def _open_ro(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def open_inherited(
    spec: VMSpec, identity: Identity | None, vhost: bool, opened: list[int]
) -> Inherited:
    """Open everything ``spec``'s QEMU uses, appending each descriptor to ``opened`` as
    it is made (the caller closes them, after the spawn or on an error)."""

    def keep(*fds: int) -> int:
        opened.extend(fds)
        return fds[-1]

    def keep_disk(disk: Disk) -> tuple[int, ...]:
        fds = _open_disk(disk)
        opened.extend(fds)
        return fds

    ch = spec.channels
    initrd, restore = spec.initrd, spec.restore
    return Inherited(
        kernel=keep(open_readable(spec.kernel, identity)),
        initrd=None if initrd is None else keep(open_readable(initrd, identity)),
        console=keep(_open_channel(ch.console_log)),
        stdout=keep(_open_channel(ch.stdout_log)),
        stderr=keep(_open_channel(ch.stderr_log)),
        status=keep(_open_channel(ch.status_file)),
        control=keep(_listen_control(ch.control_socket)),
        execs=tuple(keep(_listen_control(p)) for p in ch.exec_sockets),
        disks=tuple(keep_disk(d) for d in spec.disks),
        taps=tuple(keep(_attach_tap(n.tap)) if n.tap else None for n in spec.nics),
        vhost=tuple(
            keep(os.open("/dev/vhost-net", os.O_RDWR | os.O_CLOEXEC)) if vhost and n.tap else None
            for n in spec.nics
        ),
        restore=None if restore is None else keep(_open_ro(restore)),
    )


def find_qemu() -> str:
    path = shutil.which(QEMU_BINARY) or shutil.which(QEMU_BINARY, path="/usr/bin:/usr/sbin")
    if not path:
        raise VMMNotInstalled(
            f"{QEMU_BINARY} not found", hint="install Debian's qemu-system-x86 (make setup)"
        )
    return path


class QemuVM(VM):
    def __init__(self, spec: VMSpec, pid: int | None = None) -> None:
        super().__init__(spec, pid)
        self._proc: subprocess.Popen[bytes] | None = None
        #: the uid this VM's QEMU runs as, held until it has exited
        self._lease: IdentityLease | None = None

    def _vhost(self) -> bool:
        return self.spec.accel == "kvm" and os.path.exists("/dev/vhost-net")

    def argv(self, fds: Inherited | None = None) -> list[str]:
        """The command line; without ``fds``, that of an unconfined QEMU which opens its
        paths itself (the template builder's)."""
        return qemu_argv(
            self.spec,
            binary=find_qemu(),
            kernel_is_elf=is_elf(self.spec.kernel),
            tsc_khz=host_tsc_khz(),
            vhost=self._vhost(),
            fds=fds,
        )

    def start(self) -> int:
        """Start QEMU confined (``ember.vm.vmm.jail``): as a uid of its own when the
        monitor is root, with what it needs inherited, under its seccomp filter."""
        if self.pid is not None:
            raise VMMError(f"machine {self.spec.name} is already started")
        lease = lease_identity() if can_confine() else None
        identity = None
        opened: list[int] = []
        try:
            if lease is not None:
                kvm = kvm_group() if self.spec.accel == "kvm" else ()
                identity = Identity(lease.identity.uid, lease.identity.gid, kvm)
            try:
                fds = open_inherited(self.spec, identity, self._vhost(), opened)
            except OSError as e:
                raise VMMError(f"cannot open what the VMM needs: {e}") from e
            self._proc = self._spawn(self.argv(fds), opened, identity, self._largest_disk(fds))
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        finally:
            close_all(opened)  # the child has its own copies
        self._lease = lease
        self.pid = self._proc.pid
        return self.pid

    def _largest_disk(self, fds: Inherited) -> int | None:
        """The size of the largest disk this VMM writes (its file size limit), as the
        descriptors it inherits have them."""
        sizes = [
            os.fstat(opened[0]).st_size
            for disk, opened in zip(self.spec.disks, fds.disks, strict=True)
            if not disk.read_only
        ]
        return max(sizes, default=None)

    def _spawn(
        self,
        argv: list[str],
        inherited: list[int],
        identity: Identity | None,
        file_size_limit: int | None = None,
    ) -> subprocess.Popen[bytes]:
        log = self.spec.vmm_log
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=inherited,
                # nothing is named relative to it, and the machine's directory is root's
                cwd="/",
                # not the caller's environment (tokens, EMBER_REGISTRY_SECRET, cloud
                # settings): a QEMU a guest escaped into reads its own /proc/PID/environ
                env=VMM_ENVIRONMENT,
                # enters the identity, then sets the parent-death signal: QEMU dies when
                # its monitor dies (no orphaned VMs)
                preexec_fn=functools.partial(  # noqa: PLW1509
                    enter, identity, kvm=self.spec.accel == "kvm",
                    file_size_limit=file_size_limit, parent=os.getpid(),
                    detach=loop_mounts() if identity is not None else (),
                ),  # fmt: skip
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise VMMError(f"cannot start {argv[0]}: {e}") from e
        finally:
            if log and not isinstance(out, int):
                out.close()

    def kill(self) -> None:
        if self._proc is not None:
            # through Popen, which signals nothing once it has reaped the process: by
            # pid, a reaped QEMU's number could be another process's by now
            self._proc.kill()
            return
        super().kill()

    def wait(self, timeout: float | None = None) -> VMExit | None:
        if self._proc is not None:
            try:
                rc = self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
            lease, self._lease = self._lease, None
            if lease is not None:
                lease.release()  # QEMU has exited: its uid is free again (once: wait is
                # called again after the end, when the uid may be another VMM's)
            return VMExit(None, -rc) if rc < 0 else VMExit(rc, None)
        if self.pid is None:
            raise VMMError(f"machine {self.spec.name} was never started")
        # not our child: we can see that it ended, not how
        return VMExit(None, None) if wait_pid_exit(self.pid, timeout) else None


class QemuMicrovm(VMM):
    name = "qemu"

    def create(self, spec: VMSpec) -> QemuVM:
        if not spec.kernel.is_file():
            raise VMMError(f"kernel {spec.kernel} does not exist")
        if spec.initrd is not None and not spec.initrd.is_file():
            raise VMMError(f"initrd {spec.initrd} does not exist")
        return QemuVM(spec)

    def attach(self, spec: VMSpec, pid: int) -> QemuVM:
        return QemuVM(spec, pid)
