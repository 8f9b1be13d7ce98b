"""``ember stats``: what a machine uses, as docker's columns show it (pure).

A machine is a VMM process on the host, so its usage is that process's, read by
``statsprobe`` from ``/proc``: CPU time (a percentage of one CPU, over the time
between two samples, as docker's: 150% is one and a half CPUs), resident memory
against the guest's memory (QEMU's own few MiB included: a machine can show a
little more than its limit), the bytes its TAP device passed (from the guest's
side: received / sent), and the bytes it read from and wrote to its disks'
storage (page cache hits excluded).  The guest's processes are the guest's:
``PIDs`` is ``--``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: docker's binary units for memory, decimal for I/O (go-units BytesSize, HumanSize)
_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DECIMAL = ("B", "kB", "MB", "GB", "TB", "PB")


@dataclass(frozen=True)
class Sample:
    """One reading of a running machine's counters."""

    #: monotonic seconds
    at: float
    #: the VMM's user + system CPU time, in clock ticks
    cpu_ticks: int
    #: the VMM's resident memory, bytes
    rss: int
    #: bytes the guest received and sent through its TAP device (None: not known)
    net_rx: int | None
    net_tx: int | None
    #: bytes the VMM read from and wrote to storage
    block_read: int
    block_write: int


@dataclass(frozen=True)
class Usage:
    #: percent of one CPU; None without an earlier sample to measure from
    cpu_percent: float | None
    memory: int
    memory_limit: int
    net_rx: int | None
    net_tx: int | None
    block_read: int
    block_write: int

    @classmethod
    def stopped(cls, memory_limit: int) -> Usage:
        """A machine that does not run (``stats -a``): nothing used, as docker shows it."""
        return cls(0.0, 0, memory_limit, 0, 0, 0, 0)


def usage(before: Sample | None, now: Sample, *, memory_limit: int, ticks_per_second: int) -> Usage:
    """What ``now`` says the machine uses; its CPU over the time since ``before``."""
    cpu = None
    if before is not None and now.at > before.at:
        used = max(0, now.cpu_ticks - before.cpu_ticks) / ticks_per_second
        cpu = 100.0 * used / (now.at - before.at)
    return Usage(cpu, now.rss, memory_limit, now.net_rx, now.net_tx, now.block_read, now.block_write)


def binary_size(n: float) -> str:
    """go-units' ``BytesSize``: four significant digits, binary units, no space (``150.3MiB``)."""
    return _scaled(n, 1024, _BINARY, 4)


def decimal_size(n: float) -> str:
    """go-units' ``HumanSizeWithPrecision(n, 3)``, as docker stats's I/O: ``1.21kB``."""
    return _scaled(n, 1000, _DECIMAL, 3)


def _scaled(n: float, base: int, units: tuple[str, ...], digits: int) -> str:
    i = 0
    while n >= base and i < len(units) - 1:
        n /= base
        i += 1
    return f"{n:.{digits}g}{units[i]}"


def columns(u: Usage) -> dict[str, str]:
    """docker's ``stats`` fields of one machine (its ``--format`` names)."""
    mem_percent = 100.0 * u.memory / u.memory_limit if u.memory_limit else 0.0

    def pair(a: int | None, b: int | None) -> str:
        return f"{'--' if a is None else decimal_size(a)} / {'--' if b is None else decimal_size(b)}"

    return {
        "CPUPerc": "--" if u.cpu_percent is None else f"{u.cpu_percent:.2f}%",
        "MemUsage": f"{binary_size(u.memory)} / {binary_size(u.memory_limit)}",
        "MemPerc": f"{mem_percent:.2f}%",
        "NetIO": pair(u.net_rx, u.net_tx),
        "BlockIO": pair(u.block_read, u.block_write),
        "PIDs": "--",
    }
