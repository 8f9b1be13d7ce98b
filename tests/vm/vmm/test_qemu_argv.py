"""The QEMU command line, rendered without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.vm.vmm.base import EXEC_PORTS, Channels, Disk, Nic, VMSpec
from ember.vm.vmm.errors import VMMError
from ember.vm.vmm.qemu import (
    MAX_CMDLINE,
    PORT_CONTROL,
    PORT_STATUS,
    PORT_STDERR,
    PORT_STDOUT,
    Inherited,
    qemu_argv,
    tsc_khz_of,
)


def spec(tmp: Path = Path("/m"), **kw: object) -> VMSpec:
    base: dict[str, object] = dict(
        name="abc",
        kernel=Path("/k/vmlinux"),
        initrd=Path("/m/initrd.img"),
        channels=Channels.in_dir(tmp),
        memory_mib=256,
        cpus=2,
        disks=(Disk(Path("/m/root.img")),),
        nics=(Nic("em-abc", "02:00:ac:1e:00:02"),),
    )
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def opt_values(argv: list[str], opt: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == opt]


def test_tcg_elf_uses_cpu_max_and_skips_tsc_calibration() -> None:
    argv = qemu_argv(spec(), tsc_khz=2600000)
    assert opt_values(argv, "-accel") == ["tcg"]
    assert opt_values(argv, "-cpu") == ["max"]
    (append,) = opt_values(argv, "-append")
    assert "console=ttyS0" in append.split()
    assert "panic=-1" in append.split()
    assert "tsc_early_khz=2600000" in append.split()
    assert "-no-reboot" in argv
    assert opt_values(argv, "-M")[0].startswith("microvm")
    assert opt_values(argv, "-m") == ["256"] and opt_values(argv, "-smp") == ["2"]
    assert opt_values(argv, "-kernel") == ["/k/vmlinux"]
    assert opt_values(argv, "-initrd") == ["/m/initrd.img"]


CPUINFO = """processor\t: 0
model name\t: Some CPU
cpu MHz\t\t: 2600.004
flags\t\t: fpu tsc constant_tsc nonstop_tsc
processor\t: 1
cpu MHz\t\t: 1200.000
"""


def test_tsc_rate_only_when_constant() -> None:
    assert tsc_khz_of(CPUINFO) == 2600004
    assert tsc_khz_of(CPUINFO.replace("constant_tsc", "")) is None
    assert tsc_khz_of("processor: 0\n") is None
    assert tsc_khz_of("cpu MHz: fast\nflags: constant_tsc\n") is None


def test_tcg_bzimage_gets_default_cpu_model() -> None:
    argv = qemu_argv(spec(), kernel_is_elf=False)
    assert opt_values(argv, "-cpu") == ["qemu64"]


def test_kvm_uses_host_cpu_and_no_tsc_hint() -> None:
    argv = qemu_argv(spec(accel="kvm"), tsc_khz=2600000, vhost=True)
    assert opt_values(argv, "-accel") == ["kvm"]
    assert opt_values(argv, "-cpu") == ["host"]
    assert "tsc_early_khz" not in opt_values(argv, "-append")[0]
    assert opt_values(argv, "-netdev")[0].endswith(",vhost=on")


def test_devices_are_virtio_mmio() -> None:
    argv = qemu_argv(spec())
    devices = opt_values(argv, "-device")
    assert "virtio-blk-device,drive=disk0" in devices
    assert "virtio-net-device,netdev=net0,mac=02:00:ac:1e:00:02" in devices
    assert "virtio-serial-device,max_ports=16" in devices
    assert not [d for d in devices if "pci" in d]
    (drive,) = opt_values(argv, "-drive")
    assert drive.startswith("id=disk0,file=/m/root.img,format=raw,if=none")
    (netdev,) = opt_values(argv, "-netdev")
    assert netdev == "tap,id=net0,ifname=em-abc,script=no,downscript=no"


def test_guest_channel_ports_match_the_contract(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path))
    devices = opt_values(argv, "-device")
    chardevs = {c.split(",")[1].removeprefix("id="): c for c in opt_values(argv, "-chardev")}
    ports = {}
    for d in devices:
        if d.startswith("virtserialport,"):
            fields = dict(f.split("=", 1) for f in d.split(",")[1:])
            ports[fields["name"]] = chardevs[fields["chardev"]]
    execs = {f"org.ember.exec.{n}" for n in range(EXEC_PORTS)}
    assert set(ports) == {PORT_STDOUT, PORT_STDERR, PORT_STATUS, PORT_CONTROL, *execs}
    for n in range(EXEC_PORTS):  # one session each (init/src/exec.c)
        assert ports[f"org.ember.exec.{n}"] == f"socket,id=exec{n},path=exec-{n}.sock,server=on,wait=off"
    assert ports[PORT_STDOUT] == f"file,id=out,path={tmp_path}/stdout.log,append=on"
    assert ports[PORT_STDERR] == f"file,id=err,path={tmp_path}/stderr.log,append=on"
    assert ports[PORT_STATUS] == f"file,id=status,path={tmp_path}/status.json,append=on"
    # relative to the VMM's cwd (the machine dir): sun_path holds only 107 bytes
    assert ports[PORT_CONTROL] == "socket,id=control,path=control.sock,server=on,wait=off"
    assert opt_values(argv, "-serial") == ["chardev:console"]
    assert chardevs["console"] == f"file,id=console,path={tmp_path}/console.log,append=on"


def test_commas_in_paths_are_escaped() -> None:
    argv = qemu_argv(spec(disks=(Disk(Path("/m/a,b.img"), read_only=True),)))
    (drive,) = opt_values(argv, "-drive")
    assert "file=/m/a,,b.img," in drive
    assert drive.endswith(",readonly=on")


def test_no_disks_no_nics_no_initrd() -> None:
    argv = qemu_argv(spec(disks=(), nics=(), initrd=None))
    assert "-drive" not in argv and "-netdev" not in argv and "-initrd" not in argv


def test_extra_kernel_args_are_appended_and_checked() -> None:
    argv = qemu_argv(spec(cmdline=("ember.debug=1",)))
    assert opt_values(argv, "-append")[0].endswith(" ember.debug=1")
    with pytest.raises(VMMError):
        qemu_argv(spec(cmdline=("a\nb",)))


def test_a_kernel_command_line_too_long_for_the_guest_is_refused() -> None:
    """Past x86's 2047 bytes the guest hung before its console came up, without a word."""
    fits = ("x" * (MAX_CMDLINE - 200),)
    assert len(opt_values(qemu_argv(spec(cmdline=fits), tsc_khz=2600000), "-append")[0]) < 2047
    with pytest.raises(VMMError, match="command line is"):
        qemu_argv(spec(cmdline=("x" * 2000,)), tsc_khz=2600000)


@pytest.mark.parametrize(
    "kw",
    [{"accel": "hvf"}, {"cpus": 0}, {"cpus": 65}, {"memory_mib": 16}],
)
def test_spec_validation(kw: dict[str, object]) -> None:
    with pytest.raises(VMMError):
        spec(**kw)


@pytest.mark.parametrize(
    ("tap", "mac"),
    [("em-abc", "02:00:ac:1e:00:02,romfile=/x"), ("em-abc,script=/x", "02:00:ac:1e:00:02"),
     ("em-abc", "")],
)  # fmt: skip
def test_a_nic_whose_values_would_add_qemu_options_is_refused(tap: str, mac: str) -> None:
    """The MAC and TAP name go into QEMU's option strings, where a ',' starts another."""
    with pytest.raises(VMMError, match="invalid"):
        Nic(tap, mac)


def fds(**kw: object) -> Inherited:
    base: dict[str, object] = dict(
        kernel=10, initrd=11, console=12, stdout=13, stderr=14, status=15, control=16,
        disks=((17, 18),), taps=(19,), vhost=(None,), restore=None, execs=(30, 31, 32, 33),
    )  # fmt: skip
    base.update(kw)
    return Inherited(**base)  # type: ignore[arg-type]


def fdset_of(argv: list[str], path: str) -> list[int]:
    """The descriptors ``-add-fd`` puts in the set ``/dev/fdset/N`` names."""
    n = path.removeprefix("/dev/fdset/")
    fields = [dict(f.split("=") for f in v.split(",")) for v in opt_values(argv, "-add-fd")]
    return [int(f["fd"]) for f in fields if f["set"] == n]


def test_a_confined_vmm_runs_sandboxed_on_inherited_descriptors(tmp_path: Path) -> None:
    """Nothing is named by a path QEMU would open itself, and QEMU may not fork or exec."""
    argv = qemu_argv(spec(tmp_path, restore=Path("/t/x.vmstate")), fds=fds(restore=20))
    assert opt_values(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert opt_values(argv, "-kernel") == ["/proc/self/fd/10"]
    assert opt_values(argv, "-initrd") == ["/proc/self/fd/11"]
    chardevs = {c.split(",")[1].removeprefix("id="): c for c in opt_values(argv, "-chardev")}
    for cid, fd in (("console", 12), ("out", 13), ("err", 14), ("status", 15)):
        path = dict(f.split("=", 1) for f in chardevs[cid].split(",")[1:])["path"]
        assert fdset_of(argv, path) == [fd], chardevs[cid]
    assert chardevs["control"] == "socket,id=control,fd=16,server=on,wait=off"
    for n in range(EXEC_PORTS):
        assert chardevs[f"exec{n}"] == f"socket,id=exec{n},fd={30 + n},server=on,wait=off"
    (drive,) = opt_values(argv, "-drive")
    assert fdset_of(argv, drive.split(",")[1].removeprefix("file=")) == [17, 18]
    # an attached TAP: no ifname QEMU would open, no script it would run
    assert opt_values(argv, "-netdev") == ["tap,id=net0,fd=19"]
    # the saved state comes from a descriptor, not from a `cat` QEMU would spawn
    assert opt_values(argv, "-incoming") == ["fd:20"]
    assert str(tmp_path) not in " ".join(argv) and "/m/" not in " ".join(argv)


def test_a_confined_vmm_gets_its_vhost_descriptor() -> None:
    argv = qemu_argv(spec(accel="kvm"), vhost=True, fds=fds(vhost=(21,)))
    assert opt_values(argv, "-netdev") == ["tap,id=net0,fd=19,vhost=on,vhostfd=21"]


def test_a_restore_needs_its_state_as_a_descriptor() -> None:
    """The unconfined command line (the template builder's) cannot restore: QEMU would
    have to spawn a process to read the state."""
    with pytest.raises(VMMError, match="descriptor"):
        qemu_argv(spec(restore=Path("/t/x.vmstate")))


def test_kill_after_the_vmm_was_reaped_signals_nothing() -> None:
    """VM.kill signalled its pid even after wait() had reaped QEMU: the monitor kills
    after a restore fails, and by then the number may be another process's."""
    import subprocess

    from ember.vm.vmm.qemu import QemuVM

    vm = QemuVM(spec())
    vm._proc = subprocess.Popen(["true"])
    vm.pid = vm._proc.pid
    assert vm.wait(10) is not None
    other = subprocess.Popen(["sleep", "30"])
    try:
        vm.pid = other.pid  # (as if the kernel had given the number out again)
        vm.kill()
        with pytest.raises(subprocess.TimeoutExpired):  # not killed: still running
            other.wait(0.3)
    finally:
        other.kill()
        other.wait()
