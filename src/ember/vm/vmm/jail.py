"""Confinement of a tenant machine's VMM: what Firecracker's jailer does, as far as
QEMU 7.2 allows.

A QEMU that a guest escapes from is whatever the host made it.  So a machine's QEMU
runs:

- under its own unprivileged identity: a uid (and a gid of the same number) leased
  from a range for as long as it runs (``lease_identity``), no supplementary groups
  but ``/dev/kvm``'s under KVM, no capabilities.  One uid per QEMU: an escaped QEMU
  cannot ptrace, signal or read ``/proc/PID/{mem,fd}`` of another machine's QEMU,
  which it could with one shared uid.  Numeric ids need no passwd entry;
- never as root at all: the monitor opens what QEMU needs (disk, TAP, log channels,
  control socket, kernel, initrd, saved state) and QEMU inherits the descriptors
  (``ember.vm.vmm.qemu``), then the child drops to that identity before exec
  (``enter``).  QEMU's own ``-runas`` cannot be used: it calls setgid/setuid after
  ``-sandbox elevateprivileges=deny`` is in force and is killed by it (SIGSYS, seen
  with 7.2), and the credential change clears the parent-death signal, so a QEMU
  would outlive its monitor;
- under QEMU's seccomp filter (``SANDBOX``): no obsolete system calls, no set*id, no
  fork or exec, no scheduler or resource-limit changes;
- in a network and an IPC namespace of its own, empty: the TAP is an inherited
  descriptor, so the guest's network works while an escaped QEMU reaches no host
  service (nothing on the host's loopback, no other host) and no host SysV IPC;
- in a mount namespace of its own where the host's shared writable places and
  ``/run`` (the host's services' sockets) are empty tmpfs of root's
  (``HIDDEN_DIRS``), ``/dev`` holds four device nodes (``VMM_DEVICES``), ``/proc``
  shows its own processes only, and no copy of the host's loop-backed mounts is
  kept (``loop_mounts``); with no core dumps and bounds on its threads, descriptors
  and file sizes;
- under ember's own seccomp filter too (``seccomp``), installed last.

What it does not get: a chroot (``-chroot`` needs root inside QEMU, which it never
has; a minimal root tree is more than 7.2 asks for).  It sees the rest of the
host's file system as an unprivileged user does: ember's state directory, machine
directories (0700) and disks (0600) are root's, so no other machine's disk is
within its reach (docs/machines.md, "Confinement").
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import resource
import signal
import stat
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ember.locks import FileLock, try_lock
from ember.process import die_with_parent, parent_death_signal
from ember.vm.vmm import seccomp
from ember.vm.vmm.errors import VMMError

#: QEMU's seccomp filter for a tenant's VMM (``-sandbox``)
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

#: ``FIRST-LAST``: the uids (and gids) a VMM may run as; the default, 0x70000000 and
#: the 65535 after it, lies in a block systemd leaves unassigned (above the container
#: ranges, below the "foreign" range), so it collides with no user or container
IDS_ENV = "EMBER_VM_IDS"
DEFAULT_IDS = range(0x70000000, 0x70010000)
_LOWEST_ID = 65536
#: one lock file per leased uid; host-wide, since homes on one host must not share a uid
LEASE_DIR = Path("/run/ember/vm-ids")

log = logging.getLogger("ember.vm")

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
_MNT_DETACH = 2
#: trees a loop-backed mount is left alone under in a VMM's namespace: what QEMU, its
#: libraries and firmware may come from
_SYSTEM_TREES = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/opt", "/nix", "/snap")
#: the host directories a VMM sees as empty and unwritable (a tmpfs of root's): shared
#: writable places (/tmp, /var/tmp; /dev/shm, memory no one is charged for, goes with
#: the host's /dev, ``_own_dev``) and /run,
#: where the host's services listen (D-Bus, journald, systemd: pathname sockets, which
#: the empty network namespace does not cover) and ember keeps its leases
HIDDEN_DIRS = ("/tmp", "/var/tmp", "/run")
#: threads (and processes) a VMM's uid may have: QEMU's vCPUs, I/O and RCU threads
#: are a few dozen; this bounds what an escaped one can spawn
VMM_NPROC = 1024
#: descriptors a VMM may have open: QEMU holds a few dozen (disks, TAP, channels,
#: eventfds per virtqueue)
VMM_NOFILE = 4096
#: the device nodes a VMM's /dev holds (and "kvm" under KVM): QEMU opens these by name;
#: everything else it needs it inherits as descriptors
VMM_DEVICES = ("null", "zero", "random", "urandom")
# loaded at import: a preexec function must not run the dynamic loader (ember.process)
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_LIBC.mount.restype = ctypes.c_int
_LIBC.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_LIBC.umount2.restype = ctypes.c_int

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def _filter_program() -> ctypes.Array[ctypes.c_char] | None:
    """``struct sock_fprog`` of ember's filter (``seccomp.program``), built before any
    fork: the child only hands it to the kernel.  None off x86-64."""
    if platform.machine() != "x86_64":
        return None
    code = ctypes.create_string_buffer(seccomp.program())
    fprog = ctypes.create_string_buffer(struct.pack("@HP", len(code.raw) // 8, ctypes.addressof(code)))
    _FILTER_KEEP.append(code)  # (the program must outlive every fork that uses it)
    return fprog


_FILTER_KEEP: list[ctypes.Array[ctypes.c_char]] = []
_FILTER = _filter_program()


@dataclass(frozen=True)
class Identity:
    """Who a confined VMM runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def can_read(self, st: os.stat_result) -> bool:
        """Whether the mode bits let this identity read the file (the kernel checks the
        owner's bits, else the group's, else the others': the first class that applies)."""
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IRUSR)
        if st.st_gid == self.gid or st.st_gid in self.groups:
            return bool(st.st_mode & stat.S_IRGRP)
        return bool(st.st_mode & stat.S_IROTH)


class IdentityLease:
    """A uid held for one VMM: the lock on its file, until ``release``."""

    def __init__(self, identity: Identity, lock: FileLock) -> None:
        self.identity = identity
        self._lock: FileLock | None = lock

    def release(self) -> None:
        """Kill whatever still runs as the uid (an escaped VMM's helpers), then let it go
        (what survives is killed again before the uid is leased again).  Once only: a
        second release came after the uid was free, when the next VMM may hold it, and
        killed that other machine's QEMU."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            clear_identity(self.identity.uid)
        except VMMError as e:
            log.warning("%s", e)
        finally:
            lock.release()


#: how long ``clear_identity`` waits for the processes it killed to be gone
_CLEAR_TIMEOUT = 5.0


def _status(pid: int | str) -> bytes | None:
    """``/proc/PID/status``, read raw (file objects made a scan ~3x slower); None once gone."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, 8192)
        finally:
            os.close(fd)
    except OSError:
        return None


def _runs_as(status: bytes, uid: int) -> bool:
    """Whether a process's real, effective or saved uid is ``uid``."""
    return str(uid).encode() in _field(status, b"Uid:")[:3]


def _processes_of(uid: int) -> list[int]:
    """Live processes whose real, effective or saved uid is ``uid``: not zombies, but a
    zombie leader whose other threads still run counts (its leader called exit(2), not
    exit_group: /proc lists only the leader, and shows it as a zombie).

    On a machine's start path: ~1.3 ms for 80 processes."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or (status := _status(name)) is None or not _runs_as(status, uid):
            continue
        zombie = _field(status, b"State:")[:1] == [b"Z"]
        if not zombie or _field(status, b"Threads:")[:1] not in ([b"0"], [b"1"], []):
            found.append(int(name))
    return found


def _field(status: bytes, key: bytes) -> list[bytes]:
    """The words after ``key`` in a /proc/PID/status text (none if it has no such line)."""
    at = status.find(b"\n" + key)
    if at < 0:
        return []
    end = status.find(b"\n", at + 1)
    return status[at + 1 + len(key) : end if end >= 0 else None].split()


def clear_identity(uid: int, timeout: float = _CLEAR_TIMEOUT) -> None:
    """Kill every process still running as ``uid``, and wait until none is left.

    A VMM dies with its monitor by its parent-death signal, but a guest that took over
    its QEMU can clear that (``prctl`` is QEMU's to call), and a monitor killed with -9
    drops its lease: the uid went to the next machine while the old QEMU ran on, and
    one uid lets a process ptrace, and take the descriptors (``pidfd_getfd``) of,
    another machine's QEMU: its disk, its initrd with the run config.  So a uid is
    cleared when it is leased and when it is given back.  A pidfd names each process:
    a pid freed and taken again between the scan and the kill is never signalled."""
    deadline = time.monotonic() + timeout
    while pids := _processes_of(uid):
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                # the pidfd names the process now: is it still the one of the scan?
                if (status := _status(pid)) is not None and _runs_as(status, uid):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)
        if time.monotonic() > deadline:
            raise VMMError(
                f"processes of VMM identity {uid} survive SIGKILL ({', '.join(map(str, pids[:5]))})"
            )
        time.sleep(0.01)


def id_range(env: Mapping[str, str] = os.environ) -> range:
    """The uids VMMs may run as: ``$EMBER_VM_IDS`` (``FIRST-LAST``), else ``DEFAULT_IDS``."""
    raw = env.get(IDS_ENV)
    if not raw:
        return DEFAULT_IDS
    first_s, sep, last_s = raw.partition("-")
    try:
        first, last = int(first_s), int(last_s)
    except ValueError:
        first = last = -1
    # below 65536: system and login users (every process of a leased uid is killed);
    # from 2^31 on, ids are negative to some tools (systemd avoids them too)
    if not sep or not _LOWEST_ID <= first <= last < 0x7FFFFFFF:
        raise VMMError(
            f"{IDS_ENV} must be FIRST-LAST, two uids from {_LOWEST_ID} to {0x7FFFFFFF - 1} "
            f"(below are the host's own users), not {raw!r}"
        )
    return range(first, last + 1)


def lease_identity(ids: range | None = None, directory: Path = LEASE_DIR) -> IdentityLease:
    """The first uid of ``ids`` no running VMM holds, leased (its gid is the same number).

    A lease is an ``flock`` on ``directory/UID``: the kernel drops it when its holder
    (the monitor) dies, and the monitor's QEMU dies with it (its parent-death signal);
    whatever of the uid still runs then (a QEMU that cleared that signal) is killed
    before the uid is leased again (``clear_identity``), so a uid is never in use by
    two VMMs."""
    ids = id_range() if ids is None else ids
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for uid in ids:
            lock = try_lock(directory / str(uid))  # held: a running VMM has that uid
            if lock is not None:
                try:
                    clear_identity(uid)  # what an earlier holder left running
                except VMMError as e:  # still dying (a process in D state): another uid
                    log.warning("%s; leasing another", e)
                    lock.release()
                    continue
                except BaseException:
                    lock.release()
                    raise
                return IdentityLease(Identity(uid, uid), lock)
    except OSError as e:
        raise VMMError(f"cannot lease a VMM identity in {directory}: {e.strerror or e}") from e
    raise VMMError(
        f"every VMM identity ({ids.start}-{ids.stop - 1}) is in use",
        hint=f"give the VMMs a larger range in {IDS_ENV}",
    )


def kvm_group(device: str = "/dev/kvm") -> tuple[int, ...]:
    """The group that may open ``/dev/kvm`` (QEMU opens it by that fixed name).

    Never root's: a VMM with supplementary group 0 reaches every file of that group
    (a host whose /dev/kvm is root:root 0600 would have given it just that)."""
    try:
        gid = os.stat(device).st_gid
    except OSError:
        return ()
    if gid == 0:
        raise VMMError(
            f"{device} belongs to group root: a confined VMM would need root's group to open it",
            hint=f"give it a group of its own: groupadd -r kvm; chgrp kvm {device}; chmod 660 {device}",
        )
    return (gid,)


def enter(
    identity: Identity | None,
    *,
    kvm: bool = False,
    file_size_limit: int | None = None,
    parent: int | None = None,
    detach: tuple[bytes, ...] = (),
) -> None:
    """In the VMM's child, before exec: its own empty network and IPC namespaces, its
    own view of /dev (``kvm``: with /dev/kvm) and /proc, its limits and its identity
    (when there is one: the monitor runs as root), then the parent-death signal, which
    the kernel clears on a change of credentials and so must come after it, then
    no_new_privs and ember's seccomp filter (``seccomp``).

    ``file_size_limit``: the size no file may be written past (the largest disk it
    writes): an escaped QEMU grew its disk through its descriptor (fallocate, pwrite)
    until the pool every machine's disk lives in, and the host's file system under it,
    were full.  ``parent``: the monitor's pid; if it died before the parent-death signal
    was set, the VMM would outlive it, unseen, so this child ends instead.  ``detach``:
    the mount points whose copies its namespace drops (``loop_mounts``)."""
    if identity is not None:
        if _LIBC.unshare(_CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWNS) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"unshare: {os.strerror(e)}")
        _hide_host_dirs(kvm, detach)
        # no core dump (it would hold the guest's memory); a bound on its threads and
        # its descriptors
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (VMM_NPROC, VMM_NPROC))
        resource.setrlimit(resource.RLIMIT_NOFILE, (VMM_NOFILE, VMM_NOFILE))
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        os.setgroups(list(identity.groups))
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    if parent is None:
        parent_death_signal(signal.SIGKILL)
    else:
        die_with_parent(parent)  # (the monitor may have died before the signal was set)
    # last: the filter refuses prctl(PR_SET_PDEATHSIG) from here on (also for a QEMU of
    # a non-root ember's, with its caller's uid: no_new_privs needs no privilege)
    if (
        _FILTER is not None
        and (
            _LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            or _LIBC.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, _FILTER, 0, 0) != 0
        )
    ):
        e = ctypes.get_errno()
        raise OSError(e, f"cannot install the VMM's seccomp filter: {os.strerror(e)}")


def _hide_host_dirs(kvm: bool, detach: tuple[bytes, ...]) -> None:
    """In the VMM's own mount namespace (mounts made private first, so nothing goes back
    to the host's): a /dev of its own, an empty tmpfs of root's over each of
    ``HIDDEN_DIRS``, and a /proc that shows no other user's processes."""
    if _LIBC.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount --make-rprivate /: {os.strerror(e)}")
    _detach(detach)
    _own_dev(VMM_DEVICES + (("kvm",) if kvm else ()))
    for target in HIDDEN_DIRS:
        if not os.path.isdir(target):
            continue
        _mount(b"tmpfs", target, b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"size=4k,mode=0755")
    # Other processes' command lines held secrets (`ember run -e PASSWORD=...`, another
    # tenant's kernel arguments): a procfs of its own (Linux 5.8: options per mount)
    # where only its own uid's processes exist
    _mount(b"proc", "/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"hidepid=2")


def loop_mounts() -> tuple[bytes, ...]:
    """The host's loop-backed mount points a VMM's namespace detaches its copies of
    (``enter``'s ``detach``), deepest first: every state directory's snapshot pool, the
    mounts of layers being built.  QEMU reaches its disk through a descriptor, and a
    copy kept a loop device busy for as long as the machine ran (a pool could not be
    released, a builder's loop device not freed, until then).  Not those under the
    system's own trees, which QEMU, its libraries and firmware may come from (a live
    system's root is a loop-backed image).  Read in the parent: the child only detaches."""
    from ember.snapshots.system import mounts  # (mountinfo's parser)

    found = [
        os.fsencode(m.mountpoint) for m in mounts()
        if m.source.startswith("/dev/loop") and not _under_system_tree(str(m.mountpoint))
    ]  # fmt: skip
    return tuple(sorted(found, key=len, reverse=True))


def _under_system_tree(path: str) -> bool:
    return any(path == top or path.startswith(f"{top}/") for top in _SYSTEM_TREES) or path == "/"


def _detach(targets: tuple[bytes, ...]) -> None:
    for target in targets:
        _LIBC.umount2(target, _MNT_DETACH)  # (gone already with its parent: fine)


def _own_dev(names: tuple[str, ...]) -> None:
    """A tmpfs over /dev holding only the device nodes ``names``, made as the host's
    (mode, owner, device number).  The host's /dev gave an escaped QEMU every
    pseudo-terminal (/dev/ptmx: kernel.pty.max is host-wide, and SSH logins need one)
    and whatever udev leaves open to all (/dev/vhost-net, /dev/vhost-vsock)."""
    found = []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            found.append((name, os.stat(f"/dev/{name}")))
    _mount(b"tmpfs", "/dev", b"tmpfs", _MS_NOSUID | _MS_NOEXEC, b"size=4k,mode=0755")
    for name, st in found:
        path = f"/dev/{name}"
        os.mknod(path, st.st_mode, st.st_rdev)
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode))  # (mknod's mode went through the umask)


def _mount(source: bytes, target: str, fstype: bytes, flags: int, options: bytes) -> None:
    if _LIBC.mount(source, target.encode(), fstype, flags, options) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"cannot give the VMM its own {target}: {os.strerror(e)}")


def can_confine() -> bool:
    """Whether this process can give a VMM another identity (it runs as root)."""
    return os.geteuid() == 0


def readable_copy(fd: int, name: str) -> int:
    """A memfd holding the file ``fd`` (a VMM that reads a path the monitor cannot make
    readable to it otherwise: a root-only initrd, which holds the machine's config)."""
    size = os.fstat(fd).st_size
    copy = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        sent = 0
        while sent < size:
            n = os.sendfile(copy, fd, sent, size - sent)
            if n == 0:
                raise VMMError(f"{name} changed size while being copied")
            sent += n
    except BaseException:
        os.close(copy)
        raise
    return copy


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
