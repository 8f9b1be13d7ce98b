"""The VMM's identity leases and the checks behind what it is handed (no QEMU here)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ember.vm.vmm.errors import VMMError
from ember.vm.vmm.jail import (
    DEFAULT_IDS,
    IDS_ENV,
    Identity,
    id_range,
    lease_identity,
    readable_copy,
)


def test_the_id_range_comes_from_the_environment() -> None:
    assert id_range({}) == DEFAULT_IDS
    assert id_range({IDS_ENV: "200000-200009"}) == range(200000, 200010)


@pytest.mark.parametrize("raw", ["0-10", "10", "10-5", "a-b", "1-2147483647", "-5-10", "1000-2000"])
def test_an_id_range_that_could_name_root_or_nothing_is_refused(raw: str) -> None:
    with pytest.raises(VMMError, match=IDS_ENV):
        id_range({IDS_ENV: raw})


def test_each_vmm_gets_a_uid_of_its_own_until_it_releases_it(tmp_path: Path) -> None:
    ids = range(300000, 300003)
    a, b = lease_identity(ids, tmp_path), lease_identity(ids, tmp_path)
    assert a.identity.uid != b.identity.uid
    assert {a.identity.uid, b.identity.uid} <= set(ids)
    assert a.identity.gid == a.identity.uid
    c = lease_identity(ids, tmp_path)
    with pytest.raises(VMMError, match="in use"):
        lease_identity(ids, tmp_path)
    b.release()
    again = lease_identity(ids, tmp_path)
    assert again.identity.uid == b.identity.uid
    for lease in (a, c, again):
        lease.release()


def test_a_lease_holds_against_other_processes(tmp_path: Path) -> None:
    """The lease is a lock the kernel keeps for the holder (the monitor) until it lets
    go or dies: another monitor's attempt must not get the same uid."""
    ids = range(300000, 300001)
    lease = lease_identity(ids, tmp_path)
    pid = os.fork()
    if pid == 0:  # another monitor
        try:
            lease_identity(ids, tmp_path)
            os._exit(1)
        except VMMError:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a second process leased a held uid"
    lease.release()


@pytest.mark.parametrize(
    ("uid", "gid", "mode", "readable"),
    [
        (5, 5, 0o600, True),  # its own file
        (5, 5, 0o066, False),  # the owner's bits decide for the owner
        (0, 5, 0o640, True),  # its group
        (0, 0, 0o640, False),  # root's
        (0, 0, 0o644, True),  # anyone's
        (0, 7, 0o640, True),  # a supplementary group (/dev/kvm's)
    ],
)
def test_readability_follows_the_mode_bits(uid: int, gid: int, mode: int, readable: bool) -> None:
    st = os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))
    assert Identity(5, 5, (7,)).can_read(st) is readable


def test_a_readable_copy_holds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "initrd"
    data = os.urandom(300_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    copy = readable_copy(fd, "initrd")
    try:
        assert os.pread(copy, len(data) + 1, 0) == data
    finally:
        os.close(fd)
        os.close(copy)


def test_a_uid_is_cleared_of_what_an_earlier_vmm_left_before_it_is_leased(tmp_path: Path) -> None:
    """A QEMU that cleared its parent-death signal outlived its monitor (killed with -9,
    which dropped the lease): the next machine got the same uid, and with it ptrace and
    pidfd_getfd over the old QEMU's reach (its disk, its run config).  The processes of
    a uid are killed when it is leased, and when it is given back."""
    import subprocess

    ids = range(300010, 300011)
    uid = ids.start
    as_uid = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    def running_as_uid() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*as_uid, "sleep", "600"], start_new_session=True)
        while f"Uid:\t{uid}\t" not in Path(f"/proc/{proc.pid}/status").read_text():
            time.sleep(0.005)  # (setpriv changes its uid after it started)
        return proc

    left = running_as_uid()
    again = None
    try:
        lease = lease_identity(ids, tmp_path)  # its lock was free: its monitor is gone
        assert left.wait(10) == -9
        again = running_as_uid()
        lease.release()
        assert again.wait(10) == -9
        # the uid is free: the next machine's VMM runs as it; a second release of the old
        # lease (QemuVM.wait, called again after its QEMU ended) killed that one
        again = running_as_uid()
        lease.release()
        time.sleep(0.2)
        assert again.poll() is None, "a released lease killed the uid's next holder"
    finally:
        left.kill()
        if again is not None:
            again.kill()


def test_a_vmm_never_gets_roots_group_for_dev_kvm(tmp_path: Path) -> None:
    """/dev/kvm root:root 0600 gave a KVM machine's QEMU supplementary group 0."""
    from ember.vm.vmm.jail import kvm_group

    device = tmp_path / "kvm"
    device.write_bytes(b"")
    os.chown(device, 0, 0)
    with pytest.raises(VMMError, match="belongs to group root"):
        kvm_group(str(device))
    os.chown(device, 0, 12345)
    assert kvm_group(str(device)) == (12345,)
    assert kvm_group(str(tmp_path / "none")) == ()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="ember's filter is x86-64's")
def test_a_confined_vmm_cannot_reach_what_qemus_own_filter_leaves_open() -> None:
    """QEMU's -sandbox is a deny-list: ptrace, keyctl, bpf, io_uring (which seccomp never
    sees through) and prctl(PR_SET_PDEATHSIG) (which lets a VMM outlive its monitor)
    stayed callable by a QEMU a guest escaped into.  ember's filter, installed by
    ``enter`` under QEMU's, refuses them; what QEMU uses goes on working."""
    probe = (
        "import ctypes, json, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def call(nr, *a):\n"
        "    return 0 if libc.syscall(nr, *a) >= 0 else ctypes.get_errno()\n"
        "print(json.dumps({'ptrace': call(101, 0x4206, os.getppid(), 0, 0),\n"
        "    'keyctl': call(250, 0, 0, 0, 0), 'bpf': call(321, 0, 0, 0),\n"
        "    'pidfd_getfd': call(438, 0, 0, 0), 'io_uring_setup': call(425, 1, 0),\n"
        "    'pdeathsig': call(157, 1, 0, 0, 0), 'set_name': call(157, 15, b'x', 0, 0),\n"
        "    'getpid': call(39)}))\n"
    )
    got = _run_confined(probe)
    eperm, enosys = 1, 38
    assert got == {"ptrace": eperm, "keyctl": eperm, "bpf": eperm, "pidfd_getfd": eperm,
                   "io_uring_setup": enosys, "pdeathsig": eperm, "set_name": 0, "getpid": 0}  # fmt: skip


def test_a_confined_vmm_sees_no_shared_writable_place_nor_the_hosts_sockets() -> None:
    """An escaped QEMU connected to pathname sockets under /run (D-Bus, journald: the
    empty network namespace does not cover them), wrote to /tmp and /dev/shm (memory
    charged to no one), had no bound on its threads and could dump the guest's memory
    in a core file."""
    from ember.vm.vmm.jail import VMM_NPROC

    probe = (
        "import json, os, resource\n"
        "def writable(d):\n"
        "    try:\n"
        "        open(os.path.join(d, 'x'), 'w').close()\n"
        "        return True\n"
        "    except OSError:\n"
        "        return False\n"
        "print(json.dumps({'run': os.listdir('/run'), 'tmp': os.listdir('/tmp'),\n"
        "    'writable': [d for d in ('/tmp', '/var/tmp', '/dev/shm', '/run') if writable(d)],\n"
        "    'core': resource.getrlimit(resource.RLIMIT_CORE),\n"
        "    'nproc': resource.getrlimit(resource.RLIMIT_NPROC)}))\n"
    )
    got = _run_confined(probe)
    assert got == {"run": [], "tmp": [], "writable": [], "core": [0, 0], "nproc": [VMM_NPROC] * 2}
    assert os.listdir("/run")  # the host's own are untouched


def test_a_confined_vmm_cannot_grow_its_disk_nor_reach_the_hosts_devices_or_processes(
    tmp_path: Path,
) -> None:
    """Review findings, from an escaped QEMU's side: it grew its disk through its own
    descriptor (fallocate, pwrite) until the pool every machine's disk lives in, and
    the host's file system, were full; it opened every pseudo-terminal of the host
    (/dev/ptmx) and whatever udev leaves open to all; and it read every process's
    command line (secrets given with `ember run -e`, other tenants' kernel arguments)."""
    disk = tmp_path / "disk"
    disk.write_bytes(b"\0" * 8192)
    fd = os.open(disk, os.O_RDWR)
    try:
        os.fchmod(fd, 0o666)  # (the monitor's descriptor of a disk QEMU may write)
        probe = (
            "import json, os, resource\n"
            f"fd = {fd}\n"
            "def write_at(offset):\n"
            "    try:\n"
            "        os.pwrite(fd, b'x', offset)\n"
            "        return 'written'\n"
            "    except OSError as e:\n"
            "        return e.errno\n"
            "def opens(path):\n"
            "    try:\n"
            "        os.close(os.open(path, os.O_RDWR))\n"
            "        return True\n"
            "    except OSError:\n"
            "        return False\n"
            "print(json.dumps({'inside': write_at(8191), 'past': write_at(8192),\n"
            "    'fsize': resource.getrlimit(resource.RLIMIT_FSIZE),\n"
            "    'dev': sorted(os.listdir('/dev')), 'null': opens('/dev/null'),\n"
            "    'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),\n"
            "    'me': os.getpid(), 'nofile': resource.getrlimit(resource.RLIMIT_NOFILE)[1]}))\n"
        )
        got = _run_confined(probe, (fd,), file_size_limit=8192, parent=os.getpid())
    finally:
        os.close(fd)
    assert got["inside"] == "written" and got["past"] == 27  # EFBIG
    assert got["fsize"] == [8192, 8192] and disk.stat().st_size == 8192
    assert got["dev"] == ["null", "random", "urandom", "zero"] and got["null"]
    assert got["pids"] == [got["me"]]  # no other process, the host's init neither
    assert got["nofile"] <= 4096
    assert Path("/dev/ptmx").exists() and os.listdir("/proc")  # the host's own are untouched


def test_a_confined_vmm_holds_no_copy_of_the_hosts_loop_mounts(tmp_path: Path) -> None:
    """Its mount namespace copied every mount of the host: a snapshot pool (or a layer
    being built) mounted then stayed mounted there, its loop device busy, for as long
    as the machine ran."""
    import subprocess

    image, mnt = tmp_path / "pool.img", tmp_path / "a pool"  # (a space: mountinfo's escapes)
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        from ember.vm.vmm.jail import loop_mounts

        assert os.fsencode(mnt) in loop_mounts()
        got = _run_confined(
            "import json\n"
            "print(json.dumps([l.split(' - ')[1].split()[1] + ' ' + l.split()[4]\n"
            "    for l in open('/proc/self/mountinfo').read().splitlines()]))\n",
            detach=loop_mounts(),
        )
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    sources = [entry.split(" ", 1)[0] for entry in got]
    assert not [s for s in sources if s.startswith("/dev/loop")], got
    assert any(entry.endswith(" /") for entry in got)  # what it runs from is there


def test_a_process_whose_leader_exited_alone_is_cleared_too() -> None:
    """A leader thread that calls exit(2), not exit_group, shows as a zombie in /proc while
    its other threads run on as the uid: clear_identity took it for gone."""
    import subprocess
    import sys

    from ember.vm.vmm.jail import clear_identity

    uid = 300030
    script = (
        "import ctypes, os, threading, time\n"
        f"os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "time.sleep(0.2)\n"
        "ctypes.CDLL(None).syscall(60, 0)  # exit(2): this thread only\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        status = ""
        while "Z (zombie)" not in status:
            assert time.monotonic() < deadline, status
            status = Path(f"/proc/{proc.pid}/status").read_text()
            time.sleep(0.01)
        assert f"Uid:\t{uid}" in status and "Threads:\t2" in status
        clear_identity(uid)
        assert proc.wait(10) == -9
    finally:
        proc.kill()


def _run_confined(probe: str, pass_fds: tuple[int, ...] = (), **confinement: object) -> dict:  # type: ignore[type-arg]
    """What a Python ``probe`` prints (JSON), run as a confined VMM would be (``enter``,
    with ``confinement`` as its keyword arguments)."""
    import functools
    import json
    import subprocess
    import sys

    from ember.vm.vmm.jail import enter

    # The interpreter itself, not the virtualenv's link to it: the confined process's
    # /tmp is an empty tmpfs, and a checkout there (a CI's clone) took the link with it
    python = os.path.realpath(sys.executable)
    res = subprocess.run(
        [python, "-c", probe], cwd="/", capture_output=True, text=True, timeout=60,
        pass_fds=pass_fds,
        preexec_fn=functools.partial(enter, Identity(300020, 300020), **confinement),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    got: dict = json.loads(res.stdout)  # type: ignore[type-arg]
    return got
