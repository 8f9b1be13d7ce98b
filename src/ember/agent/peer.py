"""Whether the agent may run a caller's command as if the caller ran it.

The command runs in a child of the agent, so it sees the agent's user, mount
table, network, PIDs and root directory.  That is only the caller's view when
the caller shares all of them; otherwise (``ip netns exec``, a container, a
chroot, another user) the client is told to run the command itself.
"""

from __future__ import annotations

import _socket  # not socket: the client calls this before anything imports that module
import errno
import os
import sys

# The namespaces whose difference would change what a command does or sees.
NAMESPACES = ("mnt", "net", "pid", "user", "ipc", "uts", "cgroup")
# What a process may do besides its effective uid (/proc/PID/status): a caller with
# other ids (real, saved, file system), other groups (a user dropped from a group, a
# service without its supplementary groups), fewer capabilities, or under a seccomp
# filter or no_new_privs, must not get the agent's.
IDS = ("Uid", "Gid", "Groups")
CAPABILITIES = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
CONFINEMENT = ("NoNewPrivs", "Seccomp", "Seccomp_filters")
PRIVILEGES = (*IDS, *CAPABILITIES, *CONFINEMENT)
# A process's labels under the security modules that keep one in /proc (SELinux and
# AppArmor's shared file, AppArmor's and Smack's own): another label is another policy.
LSM_LABELS = ("attr/current", "attr/apparmor/current", "attr/smack/current")


def peer_credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket (for a
    client: the one that listens).  ``struct ucred``: three 32-bit integers, host order."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    pid, uid, gid = (int.from_bytes(raw[i : i + 4], sys.byteorder) for i in (0, 4, 8))
    return pid, uid, gid


#: getsockopt(SO_PEERPIDFD), Linux 6.5: a pidfd of the process that called connect()
SO_PEERPIDFD = getattr(_socket, "SO_PEERPIDFD", 77)


def caller_pidfd(sock: _socket.socket, pid: int) -> int | None:
    """A pidfd of the caller ``pid`` (SO_PEERCRED's, taken at connect()); None if it is gone.

    A pid is only a number: once its process exits, another may get it, and
    /proc/PID then describes that one.  A pidfd names the process itself, so the
    checks of ``mismatch`` count only if the process is still alive after them
    (``still_there``).  SO_PEERPIDFD gives the connecting process even if it died
    and its number was taken since; on older kernels pidfd_open right after
    accept() leaves only the microseconds between connect() and accept()."""
    try:
        fd = sock.getsockopt(_socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return None
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError:
            return None
    if _pidfd_pid(fd) != pid:  # exited (-1), or not the process SO_PEERCRED names
        os.close(fd)
        return None
    return fd


def _pidfd_pid(fd: int) -> int | None:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "Pid":
                return int(value)
    return None


def still_there(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has not exited (a pidfd polls readable once it has)."""
    import select  # the agent's alone: the client imports this module too

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _privileges(pid: int | str) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in PRIVILEGES:
                out[key] = value.strip()
    return out


def _labels(pid: int | str) -> dict[str, bytes | None]:
    """The process's security module labels (None: that module keeps none here)."""
    out: dict[str, bytes | None] = {}
    for name in LSM_LABELS:
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                out[name] = f.read(4096)
        except OSError:  # ENOENT, EINVAL: no such module, or none active
            out[name] = None
    return out


class View:
    """What ``mismatch`` compares of a process: its namespaces, root directory,
    privileges and security labels.  The agent takes its own once: its relays, forked
    from it, share them, and reading them again cost each command ~1 ms in a freshly
    forked relay."""

    def __init__(self, pid: int | str) -> None:
        self.namespaces = {ns: _identity(f"/proc/{pid}/ns/{ns}") for ns in NAMESPACES}
        self.root = _identity(f"/proc/{pid}/root")
        self.privileges = _privileges(pid)
        self.labels = _labels(pid)


def check_caller(sock: _socket.socket, own: View | None = None) -> tuple[int, str | None]:
    """The caller's pid, and why it cannot be served here (None when it can); ``own``:
    this process's View, if taken already."""
    pid, uid, _ = peer_credentials(sock)
    pidfd = caller_pidfd(sock, pid)
    if pidfd is None:
        return pid, "the caller exited before it could be checked"
    try:
        reason = mismatch(pid, uid, own)
        if reason is None and not still_there(pidfd):
            # what /proc/PID showed may have been another process by then
            reason = "the caller exited while it was checked"
        return pid, reason
    finally:
        os.close(pidfd)


def mismatch(pid: int, uid: int, own: View | None = None) -> str | None:
    """Why the caller ``pid`` cannot be served here, or None when it can (valid only
    while the process behind ``pid`` lives: see ``check_caller``)."""
    if uid != os.geteuid():
        return f"the caller is uid {uid}; this agent runs commands as uid {os.geteuid()}"
    try:
        if own is None:
            own = View("self")
        for ns in NAMESPACES:
            if _identity(f"/proc/{pid}/ns/{ns}") != own.namespaces[ns]:
                return f"the caller is in another {ns} namespace"
        if _identity(f"/proc/{pid}/root") != own.root:
            return "the caller has another root directory"
        privileges = _privileges(pid)
        differ = {k for k in PRIVILEGES if privileges.get(k) != own.privileges.get(k)}
        if differ & set(IDS):
            return "the caller has other user or group ids (or supplementary groups) than the agent"
        if differ & set(CAPABILITIES):
            return "the caller has other capabilities than the agent"
        if differ:
            return "the caller runs under other seccomp or no_new_privs settings than the agent"
        if privileges.get("Seccomp", "0") != "0" or privileges.get("Seccomp_filters", "0") != "0":
            # (kernels before 5.9 have no Seccomp_filters line: the mode says it then)
            # /proc gives how many filters, not which: the same count may be other rules
            return "the caller runs under seccomp filters, which cannot be compared with the agent's"
        if _labels(pid) != own.labels:
            return "the caller has another security label (SELinux, AppArmor, Smack) than the agent"
    except OSError as e:
        return f"cannot inspect the caller ({e.strerror})"
    return None
