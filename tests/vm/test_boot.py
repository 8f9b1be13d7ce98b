"""Real boots: the busybox image's ext4 root disk with Debian's kernel (ELF vmlinux)
and ember's initramfs (ember-init + modules + run config), straight under
``qemu-system-x86_64 -M microvm`` (TCG here), with the guest channels of
docs/guest.md: stdout/stderr/status port files and the control socket.

Few boots on purpose: each costs seconds under TCG.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.home import Home
from ember.vm.cpio import CpioWriter
from ember.vm.initramfs import base_initramfs, write_machine_initrd
from ember.vm.kernel import KernelInfo
from ember.vm.runconfig import HostEntry, Interface, Mount, RunConfig
from ember.vm.vmm.qemu import host_tsc_khz, kernel_cmdline
from tests.support.treecmp import umoci_unpack
from tests.vm.vmm.kernelcache import cached_kernel

pytestmark = [pytest.mark.vm, pytest.mark.root]

BOOT_TIMEOUT = 180  # generous: TCG on a loaded 2-core machine


@pytest.fixture(scope="module")
def guest_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A private home for the initramfs archives; the kernel comes from the test cache."""
    return Home(tmp_path_factory.mktemp("guest-home"))


@pytest.fixture(scope="module")
def guest_kernel() -> KernelInfo:
    return cached_kernel()


@pytest.fixture(scope="module")
def root_image(busybox_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("disk") / "root.ext4"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(busybox_rootfs), str(img)],
        check=True,
        capture_output=True,
    )
    return img


class Machine:
    """One QEMU microvm, started the way docs/guest.md describes."""

    def __init__(
        self,
        d: Path,
        kernel: KernelInfo,
        initrd: Path,
        disk: Path,
        memory: int = 256,
        volumes: tuple[Path, ...] = (),
    ) -> None:
        self.dir = d
        argv = [
            "qemu-system-x86_64",
            "-M", "microvm",
            "-accel", "tcg",
            "-cpu", "max",
            "-m", str(memory),
            "-smp", "1",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-kernel", str(kernel.vmlinux),
            "-initrd", str(initrd),
            "-append", kernel_cmdline("tcg", tsc_khz=host_tsc_khz()),
            "-serial", f"file:{d / 'console.log'}",
            "-drive", f"id=root,file={disk},format=raw,if=none,cache=unsafe",
            "-device", "virtio-blk-device,drive=root",
            # a NIC with no way out: only the guest side of the network is checked here
            "-netdev", "user,id=n0,restrict=on",
            "-device", "virtio-net-device,netdev=n0",
            "-device", "virtio-serial-device",
        ]  # fmt: skip
        # volumes follow the root disk: /dev/vdb, /dev/vdc, ... in command-line order
        for i, vol in enumerate(volumes):
            argv += ["-drive", f"id=vol{i},file={vol},format=raw,if=none"]
            argv += ["-device", f"virtio-blk-device,drive=vol{i}"]
        for name in ("stdout", "stderr"):
            argv += ["-chardev", f"file,id={name},path={d / (name + '.log')}"]
            argv += ["-device", f"virtserialport,chardev={name},name=org.ember.{name}"]
        argv += ["-chardev", f"file,id=status,path={d / 'status.json'}"]
        argv += ["-device", "virtserialport,chardev=status,name=org.ember.status"]
        argv += ["-chardev", f"socket,id=control,path={d / 'control.sock'},server=on,wait=off"]
        argv += ["-device", "virtserialport,chardev=control,name=org.ember.control"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait(self) -> int:
        out, _ = self.proc.communicate(timeout=BOOT_TIMEOUT)
        assert self.proc.returncode == 0, out.decode(errors="replace")
        return self.proc.returncode

    def read(self, name: str) -> str:
        path = self.dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_output(self, text: str) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while text not in self.read("stdout.log"):
            assert self.proc.poll() is None, self.read("console.log")
            assert time.monotonic() < deadline, self.read("console.log")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    started: list[Machine] = []
    yield started
    for m in started:
        m.stop()


def boot(
    home: Home,
    kernel: KernelInfo,
    disk: Path,
    d: Path,
    rc: RunConfig,
    machines: list[Machine],
    memory: int = 256,
    volumes: tuple[Path, ...] = (),
) -> Machine:
    initrd = write_machine_initrd(base_initramfs(home, kernel), rc, d / "initrd")
    # each machine gets its own copy of the disk, as a clone would be
    own = d / "root.ext4"
    subprocess.run(["cp", "--sparse=always", str(disk), str(own)], check=True)
    m = Machine(d, kernel, initrd, own, memory, volumes)
    machines.append(m)
    return m


def test_boot_runs_program_with_config_and_reports_exit(
    guest_home: Home,
    guest_kernel: KernelInfo,
    root_image: Path,
    tmp_path: Path,
    machines: list[Machine],
) -> None:
    script = (
        'echo "hello from $(uname -r) as $(id -u):$(id -G) in $(pwd) on $(hostname)"; '
        "echo to-stderr >&2; ip -4 addr show eth0; ip route; cat /etc/hosts /etc/resolv.conf; "
        "ulimit -n; echo persisted > /data/file; grep VmLck /proc/1/status /proc/self/status; "
        "grep ' /dev ' /proc/mounts; exit 7"
    )
    volume = tmp_path / "volume.ext4"
    with open(volume, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "root_owner=1000:1000", str(volume)],
        check=True,
        capture_output=True,
    )
    rc = RunConfig(
        argv=("/bin/sh", "-c", script),
        env=("PATH=/bin",),
        user="app",
        workdir="/srv/work",
        hostname="guest-1",
        hosts=(HostEntry("10.0.2.2", ("gateway",)),),
        nameservers=("10.0.2.3",),
        network=(Interface("eth0", "10.0.2.15", 24, "10.0.2.2", 1420),),
        mounts=(Mount("/dev/vdb", "/data", "ext4", "rw,noatime"),),
    )
    m = boot(guest_home, guest_kernel, root_image, tmp_path, rc, machines, volumes=(volume,))
    m.wait()
    out = m.read("stdout.log")
    assert f"hello from {guest_kernel.version} as 1000:1000 2000 in /srv/work on guest-1\n" in out
    assert "inet 10.0.2.15/24" in out
    assert "mtu 1420" in out
    assert "default via 10.0.2.2 dev eth0" in out
    assert "10.0.2.2\tgateway" in out
    assert "nameserver 10.0.2.3" in out
    assert "devtmpfs /dev devtmpfs " in out  # (test_init_ns's runs have a tmpfs of their own)
    assert "1048576" in out
    # init keeps its memory locked (an OOM must not make it fault); the program has no lock
    locked = dict(re.findall(r"^/proc/(\w+)/status:VmLck:\s+(\d+) kB$", out, re.M))
    assert int(locked["1"]) > 256 and locked["self"] == "0", out
    assert m.read("stderr.log") == "to-stderr\n"
    assert "to-stderr" not in out
    assert json.loads(m.read("status.json")) == {
        "exit_code": 7,
        "signal": None,
        "oom_killed": False,
        # what the program's ports queued: exactly what reached the host's logs
        "sent": [len(m.read("stdout.log").encode()), len(b"to-stderr\n")],
    }
    console = m.read("console.log")
    assert "ember-init: exit code 7\n" in console
    # the root disk and the volume were left clean (volume unmounted, root remounted
    # read-only before power-off), and what the program wrote is on the volume
    for disk in (tmp_path / "root.ext4", volume):
        fsck = subprocess.run(["e2fsck", "-n", "-f", str(disk)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(
        ["debugfs", "-R", "cat /file", str(volume)], capture_output=True, text=True, check=True
    )
    assert cat.stdout == "persisted\n"


def test_stop_request_over_control_socket(
    guest_home: Home,
    guest_kernel: KernelInfo,
    root_image: Path,
    tmp_path: Path,
    machines: list[Machine],
) -> None:
    rc = RunConfig(
        argv=("/bin/sh", "-c", "trap 'echo got-term; exit 3' TERM; echo ready; "
              "while :; do sleep 0.1; done"),
        stop_timeout=30,
    )  # fmt: skip
    m = boot(guest_home, guest_kernel, root_image, tmp_path, rc, machines)
    m.wait_for_output("ready\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(tmp_path / "control.sock"))
        s.sendall(b"stop\n")
        m.wait()
    assert m.read("stdout.log").endswith("got-term\n")
    assert json.loads(m.read("status.json"))["exit_code"] == 3
    assert "ember-init: exit code 3\n" in m.read("console.log")


def test_malformed_config_powers_off_with_message(
    guest_home: Home,
    guest_kernel: KernelInfo,
    root_image: Path,
    tmp_path: Path,
    machines: list[Machine],
) -> None:
    # a truncated config (no end record), appended the way config_archive does
    w = CpioWriter()
    w.add_dir("ember")
    w.add_file("ember/config", b"ember-run-config 1\narg /bin/echo\narg never\n", 0o600)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(base_initramfs(guest_home, guest_kernel).read_bytes() + w.getvalue())
    own = tmp_path / "root.ext4"
    subprocess.run(["cp", "--sparse=always", str(root_image), str(own)], check=True)
    m = Machine(tmp_path, guest_kernel, initrd, own)
    machines.append(m)
    m.wait()
    status = json.loads(m.read("status.json"))
    assert status["exit_code"] == 125
    assert "truncated" in status["error"]
    console = m.read("console.log")
    assert "ember-init: error: run config is truncated (no end record)" in console
    assert "ember-init: exit code 125\n" in console
    assert m.read("stdout.log") == ""


def test_oom_kill_is_reported(
    guest_home: Home,
    guest_kernel: KernelInfo,
    root_image: Path,
    tmp_path: Path,
    machines: list[Machine],
) -> None:
    # each doubling copies the string: the shell itself runs out of memory and is killed
    rc = RunConfig(argv=("/bin/sh", "-c", "x=0123456789abcdef; while :; do x=$x$x; done"))
    m = boot(guest_home, guest_kernel, root_image, tmp_path, rc, machines, memory=128)
    m.wait()
    status = json.loads(m.read("status.json"))
    assert status == {"exit_code": 137, "signal": 9, "oom_killed": True, "sent": [0, 0]}, m.read(
        "console.log"
    )
    assert "ember-init: killed by signal 9 (oom killed)\n" in m.read("console.log")


def test_debian_image_boots(
    guest_home: Home,
    guest_kernel: KernelInfo,
    debian_layout: Path,
    tmp_path: Path,
    machines: list[Machine],
) -> None:
    """A real distribution's tree (debootstrap minbase) as the root disk."""
    tree = umoci_unpack(debian_layout, "latest", tmp_path / "bundle")
    disk = tmp_path / "debian.ext4"
    with open(disk, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(disk)], check=True, capture_output=True
    )
    rc = RunConfig(
        argv=("/bin/bash", "-c", '. /etc/os-release; echo "$ID $VERSION_CODENAME $GREETING"'),
        env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hi"),
        user="nobody",
    )
    d = tmp_path / "machine"
    d.mkdir()
    m = boot(guest_home, guest_kernel, disk, d, rc, machines)
    m.wait()
    assert m.read("stdout.log") == "debian bookworm hi\n"
    assert json.loads(m.read("status.json"))["exit_code"] == 0
