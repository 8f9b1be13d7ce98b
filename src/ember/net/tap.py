"""TAP devices and sysctls (ioctls on /dev/net/tun and an AF_INET socket, /proc/sys).

The TAP is made persistent and addressed with the same ioctls ``ip tuntap`` and
``ifconfig`` use, in-process: no ``ip`` process on the start-up path of a machine.
Everything acts on the network namespace of the calling thread.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
import subprocess
from pathlib import Path

from ember.net.errors import NetworkError

log = logging.getLogger("ember.net")

PROC_NET = Path("/proc/sys/net/ipv4")
PROC_NET6 = Path("/proc/sys/net/ipv6")


# linux/if_tun.h, linux/sockios.h, linux/if.h
_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_SIOCSIFADDR = 0x8916
_SIOCSIFBRDADDR = 0x891A
_TUNSETOWNER = 0x400454CC  # _IOW('T', 204, int)
_SIOCSIFNETMASK = 0x891C
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCSIFMTU = 0x8922
_IFF_UP = 0x1
_IFREQ_SIZE = 40


def _ifreq_flags(name: str, flags: int) -> bytes:
    return struct.pack("16sH", name.encode(), flags).ljust(_IFREQ_SIZE, b"\0")


def _ifreq_addr(name: str, addr: ipaddress.IPv4Address) -> bytes:
    sin = struct.pack("HH4s8x", socket.AF_INET, 0, addr.packed)
    return struct.pack("16s16s", name.encode(), sin).ljust(_IFREQ_SIZE, b"\0")


def _make_persistent_tap(name: str) -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, _ifreq_flags(name, _IFF_TAP | _IFF_NO_PI))
        # Owned by root: without an owner any uid that can open /dev/net/tun (0666 on
        # Debian) could attach to a machine's TAP while its QEMU is not attached
        # (before it starts, after it ends) and speak as the machine on its network.
        fcntl.ioctl(fd, _TUNSETOWNER, 0)
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def _address_and_up(name: str, gateway: str, prefix: int, mtu: int) -> None:
    iface = ipaddress.IPv4Interface(f"{gateway}/{prefix}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        # the guest's eth0 is given the same MTU: with the TAP's left at 1500, a
        # smaller one (a host behind a tunnel) was the guest's only, and the host
        # still sent it 1500-byte packets, which it dropped
        fcntl.ioctl(s, _SIOCSIFMTU, struct.pack("16si", name.encode(), mtu).ljust(_IFREQ_SIZE, b"\0"))
        fcntl.ioctl(s, _SIOCSIFADDR, _ifreq_addr(name, iface.ip))
        fcntl.ioctl(s, _SIOCSIFNETMASK, _ifreq_addr(name, iface.netmask))
        if prefix < 31:
            fcntl.ioctl(s, _SIOCSIFBRDADDR, _ifreq_addr(name, iface.network.broadcast_address))
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, _SIOCGIFFLAGS, _ifreq_flags(name, 0)))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, _ifreq_flags(name, flags | _IFF_UP))


def create_tap(
    name: str, gateway: str, prefix: int, *, route_localnet: bool, mtu: int = 1500
) -> None:
    """A persistent TAP named ``name`` holding the gateway address, with MTU ``mtu``, up;
    what arrives on it may be routed on (to another machine's TAP: the rules decide)."""
    try:
        _make_persistent_tap(name)
    except OSError as e:
        raise NetworkError(f"cannot create TAP {name}: {e.strerror}") from e
    try:
        _without_ipv6(name)
        # Machines of one network reach each other through the host, which routes
        # between their TAPs: that takes forwarding on the TAP the packet comes in
        # on, not host-wide (ip_forward, which only egress and published ports need).
        # Where it cannot be set (a read-only /proc/sys) the machine still runs alone.
        try:
            set_sysctl(PROC_NET / "conf" / name / "forwarding", "1")
        except NetworkError as e:
            log.warning("%s: machines of one network will not reach each other", e)
        _address_and_up(name, gateway, prefix, mtu)
    except OSError as e:
        delete_link(name)
        raise NetworkError(f"cannot configure TAP {name}: {e.strerror}") from e
    except NetworkError:
        delete_link(name)
        raise
    if route_localnet:
        # lets DNAT'd 127.0.0.1 traffic be routed out of this TAP (published ports)
        set_sysctl(PROC_NET / "conf" / name / "route_localnet", "1")


def _without_ipv6(name: str) -> None:
    """No IPv6 on the host end of a machine's TAP, before it is up.  Machines are IPv4
    only, and with IPv6 on, the host took router advertisements from the guest (a
    default route through it, preferred over the host's own) and answered it on
    link-local addresses."""
    if not PROC_NET6.is_dir():
        return  # a kernel without IPv6
    set_sysctl(PROC_NET6 / "conf" / name / "disable_ipv6", "1")


def delete_link(name: str) -> None:
    """Remove a link if it exists (idempotent)."""
    if not link_exists(name):
        return
    res = subprocess.run(["ip", "link", "del", name], capture_output=True, text=True, check=False)
    if res.returncode != 0 and link_exists(name):
        raise NetworkError(f"cannot delete {name}: {res.stderr.strip()}")


def link_exists(name: str) -> bool:
    """In this thread's network namespace (unlike /sys, which shows the mounter's)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def set_sysctl(path: Path, value: str) -> None:
    try:
        if path.read_text().strip() == value:
            return
        path.write_text(value + "\n")
    except OSError as e:
        raise NetworkError(f"cannot set {path}: {e.strerror}") from e


def enable_forwarding() -> None:
    set_sysctl(PROC_NET / "ip_forward", "1")
