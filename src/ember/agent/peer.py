"""Whether the agent may run a caller's command as if the caller ran it.

The command runs in a child of the agent, so it sees the agent's user, mount
table, network, PIDs and root directory.  That is only the caller's view when
the caller shares all of them; otherwise (``ip netns exec``, a container, a
chroot, another user) the client is told to run the command itself.
"""

from __future__ import annotations

import _socket  # not socket: the client calls this before anything imports that module
import os
import sys

# The namespaces whose difference would change what a command does or sees.
NAMESPACES = ("mnt", "net", "pid", "user", "ipc", "uts", "cgroup")
# What bounds a process beyond its uid (/proc/PID/status): a caller with fewer
# capabilities, or under a seccomp filter or no_new_privs, must not get the agent's.
PRIVILEGES = (
    "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters",
)  # fmt: skip


def peer_credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket (for a
    client: the one that listens).  ``struct ucred``: three 32-bit integers, host order."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    pid, uid, gid = (int.from_bytes(raw[i : i + 4], sys.byteorder) for i in (0, 4, 8))
    return pid, uid, gid


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


def mismatch(pid: int, uid: int) -> str | None:
    """Why the caller ``pid`` cannot be served here, or None when it can."""
    if uid != os.geteuid():
        return f"the caller is uid {uid}; this agent runs commands as uid {os.geteuid()}"
    try:
        for ns in NAMESPACES:
            if _identity(f"/proc/{pid}/ns/{ns}") != _identity(f"/proc/self/ns/{ns}"):
                return f"the caller is in another {ns} namespace"
        if _identity(f"/proc/{pid}/root") != _identity("/"):
            return "the caller has another root directory"
        if _privileges(pid) != _privileges("self"):
            return "the caller has other capabilities (or seccomp, no_new_privs) than the agent"
    except OSError as e:
        return f"cannot inspect the caller ({e.strerror})"
    return None
