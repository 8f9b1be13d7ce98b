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
  port output (back-pressure, no loss).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from functools import lru_cache
from pathlib import Path

from ember.process import parent_death_signal
from ember.vm.vmm.base import VM, VMM, VMExit, VMSpec, wait_pid_exit
from ember.vm.vmm.errors import VMMError, VMMNotInstalled

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


def _escape(value: str) -> str:
    """QEMU option values separate fields with ``,``; a literal comma is written ``,,``."""
    return value.replace(",", ",,")


def is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ELF_MAGIC


@lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host TSC rate in kHz (TCG's guest TSC ticks at the host's rate)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kernel_cmdline(spec: VMSpec, *, tsc_khz: int | None) -> str:
    args = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4"]
    if spec.accel == "tcg" and tsc_khz:
        args.append(f"tsc_early_khz={tsc_khz}")
    args += list(spec.cmdline)
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


def qemu_argv(
    spec: VMSpec,
    *,
    binary: str = QEMU_BINARY,
    kernel_is_elf: bool = True,
    tsc_khz: int | None = None,
    vhost: bool = False,
) -> list[str]:
    """The QEMU command line for ``spec`` (pure: no file system access)."""
    ch = spec.channels
    machine = "microvm,x-option-roms=off,isa-serial=on"
    argv = [binary, "-name", _escape(f"ember-{spec.name}"), "-M", machine]
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
        "-kernel", str(spec.kernel),
    ]  # fmt: skip
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    argv += ["-append", kernel_cmdline(spec, tsc_khz=tsc_khz)]
    argv += [
        "-chardev", f"file,id=console,path={_escape(str(ch.console_log))},append=on",
        "-serial", "chardev:console",
    ]  # fmt: skip
    for i, disk in enumerate(spec.disks):
        drive = f"id=disk{i},file={_escape(str(disk.path))},format=raw,if=none,discard=unmap"
        if disk.read_only:
            drive += ",readonly=on"
        argv += ["-drive", drive, "-device", f"virtio-blk-device,drive=disk{i}"]
    for i, nic in enumerate(spec.nics):
        if not nic.tap:
            # no host side (a template being built): a hub port with nobody else on it
            netdev = f"hubport,id=net{i},hubid={i}"
        else:
            netdev = f"tap,id=net{i},ifname={_escape(nic.tap)},script=no,downscript=no"
            if vhost:
                netdev += ",vhost=on"
        argv += ["-netdev", netdev, "-device", f"virtio-net-device,netdev=net{i},mac={nic.mac}"]
    argv += ["-device", "virtio-serial-device,max_ports=8"]
    for cid, port, path in (
        ("out", PORT_STDOUT, ch.stdout_log),
        ("err", PORT_STDERR, ch.stderr_log),
        ("status", PORT_STATUS, ch.status_file),
    ):
        argv += [
            "-chardev", f"file,id={cid},path={_escape(str(path))},append=on",
            "-device", f"virtserialport,chardev={cid},name={port}",
        ]  # fmt: skip
    # the socket is named relative to the VMM's working directory (its parent, see
    # QemuVM.start): an absolute path under a deep state dir can exceed the 107 bytes
    # a unix socket address holds
    argv += [
        "-chardev", f"socket,id=control,path={_escape(ch.control_socket.name)},server=on,wait=off",
        "-device", f"virtserialport,chardev=control,name={PORT_CONTROL}",
    ]  # fmt: skip
    if spec.restore is not None:
        # start from a saved state (a template) instead of booting; the devices above
        # must be those the state was saved with
        argv += ["-incoming", f"exec:cat {shlex.quote(str(spec.restore))}"]
    return argv


def find_qemu() -> str:
    path = shutil.which(QEMU_BINARY) or shutil.which(QEMU_BINARY, path="/usr/bin:/usr/sbin")
    if not path:
        raise VMMNotInstalled(
            f"{QEMU_BINARY} not found", hint="install Debian's qemu-system-x86 (make setup)"
        )
    return path


def _die_with_parent() -> None:
    """In the child before exec: QEMU dies when its monitor dies (no orphaned VMs)."""
    parent_death_signal(signal.SIGKILL)


class QemuVM(VM):
    def __init__(self, spec: VMSpec, pid: int | None = None) -> None:
        super().__init__(spec, pid)
        self._proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        kernel_is_elf = is_elf(self.spec.kernel)
        vhost = self.spec.accel == "kvm" and os.path.exists("/dev/vhost-net")
        return qemu_argv(
            self.spec,
            binary=find_qemu(),
            kernel_is_elf=kernel_is_elf,
            tsc_khz=host_tsc_khz(),
            vhost=vhost,
        )

    def start(self) -> int:
        if self.pid is not None:
            raise VMMError(f"machine {self.spec.name} is already started")
        argv = self.argv()
        log = self.spec.vmm_log
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                close_fds=True,
                cwd=self.spec.channels.control_socket.parent,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for PDEATHSIG
            )
        except OSError as e:
            raise VMMError(f"cannot start {argv[0]}: {e}") from e
        finally:
            if log and not isinstance(out, int):
                out.close()
        self.pid = self._proc.pid
        return self.pid

    def wait(self, timeout: float | None = None) -> VMExit | None:
        if self._proc is not None:
            try:
                rc = self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
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
