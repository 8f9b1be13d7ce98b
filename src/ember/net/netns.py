"""The network namespace a machine's network lives in, and acting in it from another.

A machine's TAP, its gateway address and the nftables table that holds its rules all
exist in one network namespace: the one ``ember run`` (or ``ember start``) ran in,
which is also where its monitor and VMM run.  A later ``ember rm``, or the repair of a
machine whose monitor died, may run in another namespace; acting there would leave the
machine's TAP and rules behind and could delete another namespace's same-named TAP.
So the namespace is recorded with the machine's network (``Netns``: the nsfs device
and inode that find it, the cookie that tells it from a later namespace given the same
inode, and the ``ip netns`` name that reaches it, if it has one), and teardown enters it (``run_in``: ``setns`` in a thread of its own, whose
subprocesses, ``ip`` and ``nft``, inherit it).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ember.net.errors import NetworkError

#: where ``ip netns add NAME`` bind-mounts a namespace (iproute2's NETNS_RUN_DIR)
NAMED_DIR = "/run/netns"
_SELF = "/proc/thread-self/ns/net"
_CLONE_NEWNET = 0x40000000
#: asm-generic/socket.h (Linux 5.14): a network namespace's 64-bit id, never reused
_SO_NETNS_COOKIE = 71


@dataclass(frozen=True)
class Netns:
    """A network namespace: ``dev``/``ino`` of its nsfs file identify it while it
    exists; ``path`` (``/run/netns/NAME``) reaches it while that name stays bound.

    Once it is freed the kernel hands its inode to the next namespace made (the
    lowest free number: a machine's namespace, gone, and the next ``unshare -n``
    share it), so ``cookie`` (``SO_NETNS_COOKIE``, unique while the host runs; None
    from a kernel before 5.14 or an older ember) tells the two apart."""

    dev: int
    ino: int
    path: str | None = None
    cookie: int | None = None

    def same(self, other: Netns) -> bool:
        if (self.dev, self.ino) != (other.dev, other.ino):
            return False
        return self.cookie is None or other.cookie is None or self.cookie == other.cookie

    def __str__(self) -> str:
        return self.path or f"net:[{self.ino}]"

    def to_json(self) -> dict[str, Any]:
        return {"dev": self.dev, "ino": self.ino, "path": self.path, "cookie": self.cookie}

    @classmethod
    def from_json(cls, d: Any) -> Netns:
        """ValueError when ``d`` is not what ``to_json`` writes."""
        if not isinstance(d, dict):
            raise ValueError("netns is not an object")
        dev, ino, path, cookie = d.get("dev"), d.get("ino"), d.get("path"), d.get("cookie")
        if type(dev) is not int or type(ino) is not int or dev < 0 or ino <= 0:
            raise ValueError("netns dev and ino must be positive integers")
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            raise ValueError("netns path must be an absolute path")
        if cookie is not None and (type(cookie) is not int or cookie <= 0):
            raise ValueError("netns cookie must be a positive integer")
        return cls(dev, ino, path, cookie)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _cookie() -> int | None:
    """The calling thread's network namespace's cookie (a socket is made in the
    thread's namespace); None when the kernel has none (before 5.14)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8)
    except OSError:
        return None
    cookie: int = struct.unpack("=Q", raw)[0]
    return cookie


def here() -> Netns:
    """The calling thread's network namespace (no path: for comparisons)."""
    return Netns(*_identity(os.stat(_SELF)), cookie=_cookie())


def current() -> Netns:
    """The calling thread's network namespace, with its ``ip netns`` name's path when
    it has one (what a later command in another namespace enters it by)."""
    ns = here()
    return Netns(ns.dev, ns.ino, _named_path(ns), ns.cookie)


def _named_path(ns: Netns) -> str | None:
    try:
        entries = os.scandir(NAMED_DIR)
    except OSError:
        return None
    with entries:
        for e in entries:
            try:
                if _identity(os.stat(e.path)) == (ns.dev, ns.ino):
                    return e.path
            except OSError:
                continue
    return None


def _candidates(ns: Netns) -> list[str]:
    """Where ``ns`` may be entered from: its recorded name, then any process in it (a
    namespace without a name, made by ``unshare -n`` say, lives as long as one does)."""
    paths = [ns.path] if ns.path else []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        pids = []
    return paths + [f"/proc/{pid}/ns/net" for pid in pids]


def open_netns(ns: Netns) -> int | None:
    """An fd of namespace ``ns``, None when nothing reaches it any more: neither its name
    nor a process.  Such a namespace was freed by the kernel (unless an fd or a bind
    mount ember does not know holds it), and the TAPs in it were deleted with it.

    The fd found may be of a later namespace that was given the freed one's inode:
    only entering it shows its cookie (``run_in`` does)."""
    for path in _candidates(ns):
        try:
            if _identity(os.stat(path)) != (ns.dev, ns.ino):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile (the process ended), or not ours to see
        # the name may have been bound to another namespace, or the pid reused, since
        # the stat: the fd is what counts
        if _identity(os.fstat(fd)) == (ns.dev, ns.ino):
            return fd
        os.close(fd)
    return None


def _setns(fd: int) -> None:
    """Move the calling thread (only it) into the network namespace ``fd``."""
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in(ns: Netns, fn: Callable[[], None]) -> bool:
    """Run ``fn`` in namespace ``ns``; False (``fn`` not run) when nothing reaches ``ns``
    any more (``open_netns``), or what does is a later namespace with its inode.  ``fn`` runs in a thread of its own that enters ``ns``
    and ends with ``fn`` (the namespace is per thread: the caller's stays as it was);
    what it raises is raised here, NetworkError when ``ns`` cannot be entered."""
    fd = open_netns(ns)
    if fd is None:
        return False
    failure: list[BaseException] = []
    reused: list[bool] = []

    def enter_and_run() -> None:
        try:
            _setns(fd)
        except OSError as e:
            failure.append(
                NetworkError(
                    f"cannot enter network namespace {ns}: {e.strerror or e}",
                    hint="run the command in that namespace (ip netns exec NAME ember ...)",
                )
            )
            return
        if not here().same(ns):
            reused.append(True)  # ns itself is gone, and its TAPs with it
            return
        try:
            fn()
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    try:
        worker = threading.Thread(target=enter_and_run, name="ember-netns")
        worker.start()
        worker.join()
    finally:
        os.close(fd)
    if failure:
        raise failure[0]
    return not reused
