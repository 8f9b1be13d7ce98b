"""Real boots under QEMU of a tiny busybox initramfs that exercises the guest channel
contract without ember-init: the stdout/stderr/status ports and the control socket."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ember.home import Home
from ember.vm.cpio import CpioWriter
from ember.vm.kernel import KernelInfo
from ember.vm.vmm import Channels, Disk, VMSpec, get_vmm
from ember.vm.vmm.accel import detect_accel
from ember.vm.vmm.base import open_control, write_control
from tests.vm.vmm.confined import assert_confined, proc_status

pytestmark = [pytest.mark.vm, pytest.mark.root]

MODULES = ["virtio_ring", "virtio", "virtio_mmio", "virtio_console"]

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/$m.ko; done
n=0
# a port's name file appears after the port itself (the host sends the names later)
while [ $(ls /sys/class/virtio-ports/*/name 2>/dev/null | wc -l) -lt 4 ] && [ $n -lt 500 ]; do sleep 0.05; n=$((n+1)); done
for p in /sys/class/virtio-ports/*; do ln -s /dev/${{p##*/}} /tmp/$(cat $p/name); done
echo "to-stdout" > /tmp/org.ember.stdout
echo "to-stderr" > /tmp/org.ember.stderr
# reads see EOF while no host client is connected: poll until a line arrives, on one
# descriptor: closing the port discards what arrived unread (virtio_console), so opening
# it per read lost a "stop" that came between a read's EOF and its close
exec 3< /tmp/org.ember.control
line=""
while [ -z "$line" ]; do read line <&3; [ -n "$line" ] || sleep 0.1; done
echo "{{\\"got\\": \\"$line\\"}}" > /tmp/org.ember.status
poweroff -f
"""


def find_module(kernel: KernelInfo, name: str) -> Path:
    assert kernel.modules_dir is not None
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        path = line.split(":", 1)[0]
        if Path(path).name in (f"{name}.ko", f"{name}.ko.xz", f"{name}.ko.zst"):
            assert path.endswith(".ko"), "compressed modules are not expected in Debian 12"
            return kernel.modules_dir / path
    raise AssertionError(f"module {name} not in modules.dep")


@pytest.fixture(scope="module")
def channel_initrd(kernel: KernelInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is needed"
    w = CpioWriter()
    for d in ("bin", "lib"):
        w.add_dir(d)
    w.add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for m in MODULES:
        w.add_file(f"lib/{m}.ko", find_module(kernel, m).read_bytes())
    w.add_file("init", INIT.format(modules=" ".join(MODULES)).encode(), 0o755)
    path = tmp_path_factory.mktemp("initrd") / "initrd.cpio"
    path.write_bytes(w.getvalue())
    # root's alone, as a machine's initrd is (it holds the run config): the confined VMM
    # cannot open it by path and gets a copy
    path.chmod(0o600)
    return path


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def make_spec(tmp_path: Path, kernel: KernelInfo, initrd: Path, accel: str) -> VMSpec:
    ch = Channels.in_dir(tmp_path)
    ch.precreate()
    # a root-only disk, as a machine's is: the confined VMM gets it as a descriptor
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    disk.chmod(0o600)
    return VMSpec(
        name=tmp_path.name,
        kernel=kernel.vmlinux,
        initrd=initrd,
        channels=ch,
        memory_mib=256,
        accel=accel,
        disks=(Disk(disk),),
        vmm_log=tmp_path / "vmm.log",
    )


@pytest.fixture(scope="module")
def accel(kernel: KernelInfo, tmp_path_factory: pytest.TempPathFactory) -> str:
    return detect_accel(Home(tmp_path_factory.mktemp("home")), kernel.vmlinux, quiet=True)


def test_channels_and_graceful_stop(
    tmp_path: Path, kernel: KernelInfo, channel_initrd: Path, accel: str
) -> None:
    # a deep directory: the control socket's absolute path exceeds sun_path's 107 bytes
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    spec = make_spec(deep, kernel, channel_initrd, accel)
    assert len(str(spec.channels.control_socket)) > 108
    vm = get_vmm().create(spec)
    vm.start()
    try:
        ch = spec.channels
        # two ports, two chardevs: their files fill in no particular order
        booted = wait_for(
            lambda: b"to-stderr" in ch.stderr_log.read_bytes()
            and ch.stdout_log.read_bytes().endswith(b"\n"),
            120,
        )
        assert booted, ch.console_log.read_text(errors="replace")[-2000:]
        assert vm.pid is not None
        assert_confined(vm.pid)
        assert ch.stdout_log.read_bytes() == b"to-stdout\n"
        assert b"to-stdout" not in ch.console_log.read_bytes()
        conn = open_control(ch.control_socket)
        try:
            write_control(conn, b"stop\n")
            end = vm.wait(60)
        finally:
            conn.close()
        assert end is not None and end.returncode == 0 and end.signal is None
        assert json.loads(ch.status_file.read_text()) == {"got": "stop"}
        assert not vm.alive()
    finally:
        vm.kill()


def test_kill_ends_the_vmm_at_once(
    tmp_path: Path, kernel: KernelInfo, channel_initrd: Path, accel: str
) -> None:
    spec = make_spec(tmp_path, kernel, channel_initrd, accel)
    vm = get_vmm().create(spec)
    pid = vm.start()
    other = get_vmm().attach(spec, pid)  # as another process would
    assert other.alive()
    other.kill()
    end = vm.wait(30)
    assert end is not None and end.signal == signal.SIGKILL
    assert other.wait(5) is not None
    assert not os.path.exists(f"/proc/{pid}/cmdline") or not other.alive()


#: starts two VMs as a monitor would, prints their pids, and waits to be killed
MONITOR = """
import json, sys, time
from pathlib import Path
from ember.vm.vmm import Channels, VMSpec, get_vmm
args = json.loads(sys.argv[1])
pids = []
for d in args["dirs"]:
    ch = Channels.in_dir(Path(d))
    ch.precreate()
    spec = VMSpec(name=Path(d).name, kernel=Path(args["kernel"]), initrd=Path(args["initrd"]),
                  channels=ch, memory_mib=128, accel=args["accel"])
    pids.append(get_vmm().create(spec).start())
print(json.dumps(pids), flush=True)
time.sleep(600)
"""


def test_each_vmm_has_its_own_uid_and_dies_with_its_monitor(
    tmp_path: Path, kernel: KernelInfo, channel_initrd: Path, accel: str
) -> None:
    """Two machines' QEMUs cannot reach each other's memory or descriptors (distinct
    uids), and the identity change did not cost the parent-death signal: a monitor that
    dies takes its QEMU with it (QEMU's own -runas would clear that signal)."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    args = {"dirs": [str(d) for d in dirs], "kernel": str(kernel.vmlinux),
            "initrd": str(channel_initrd), "accel": accel}  # fmt: skip
    monitor = subprocess.Popen(
        [sys.executable, "-c", MONITOR, json.dumps(args)], stdout=subprocess.PIPE, text=True
    )
    pids: list[int] = []
    try:
        assert monitor.stdout is not None
        pids = json.loads(monitor.stdout.readline())
        assert len({assert_confined(pid) for pid in pids}) == 2, "two VMMs share a uid"
        monitor.kill()
        monitor.wait()
        # killed (a zombie until init reaps it) or already gone
        assert wait_for(lambda: all(_ended(pid) for pid in pids), 10), "a VMM outlived its monitor"
    finally:
        monitor.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _ended(pid: int) -> bool:
    try:
        return proc_status(pid)["State"].startswith(("Z", "X"))
    except FileNotFoundError:
        return True
