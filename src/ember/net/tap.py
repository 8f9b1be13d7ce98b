"""TAP devices and sysctls (I/O through ``ip`` and /proc/sys)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from ember.net.errors import NetworkError

PROC_NET = Path("/proc/sys/net/ipv4")


def _ip_batch(commands: list[str]) -> None:
    try:
        res = subprocess.run(
            ["ip", "-batch", "-"],
            input="\n".join(commands) + "\n",
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise NetworkError("ip (iproute2) not found", hint="install iproute2") from None
    if res.returncode != 0:
        raise NetworkError(f"ip failed: {res.stderr.strip().splitlines()[-1:] or ['?']}")


def create_tap(name: str, gateway: str, prefix: int, *, route_localnet: bool) -> None:
    """A persistent TAP named ``name`` holding the gateway address, up."""
    _ip_batch(
        [
            f"tuntap add dev {name} mode tap",
            f"addr add {gateway}/{prefix} dev {name}",
            f"link set {name} up",
        ]
    )
    if route_localnet:
        # lets DNAT'd 127.0.0.1 traffic be routed out of this TAP (published ports)
        set_sysctl(PROC_NET / "conf" / name / "route_localnet", "1")


def delete_link(name: str) -> None:
    """Remove a link if it exists (idempotent)."""
    if not link_exists(name):
        return
    res = subprocess.run(["ip", "link", "del", name], capture_output=True, text=True, check=False)
    if res.returncode != 0 and link_exists(name):
        raise NetworkError(f"cannot delete {name}: {res.stderr.strip()}")


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def list_links(prefix: str) -> list[str]:
    with contextlib.suppress(OSError):
        return sorted(n for n in os.listdir("/sys/class/net") if n.startswith(prefix))
    return []


def set_sysctl(path: Path, value: str) -> None:
    try:
        if path.read_text().strip() == value:
            return
        path.write_text(value + "\n")
    except OSError as e:
        raise NetworkError(f"cannot set {path}: {e.strerror}") from e


def enable_forwarding() -> None:
    set_sysctl(PROC_NET / "ip_forward", "1")
