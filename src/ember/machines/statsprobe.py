"""Reading a running machine's counters from ``/proc`` (``stats`` says what they mean).

The VMM's own files give its CPU time (``stat``), resident memory (``status``) and
storage I/O (``io``); the TAP device's counters come from ``/proc/MONITOR/net/dev``,
the monitor being in the network namespace the machine's TAP was made in.  Each
process is known by its pid and its recorded start time: a pid reused by another
process is not read.
"""

from __future__ import annotations

import time

from ember.machines.state import MachineState
from ember.machines.stats import Sample
from ember.process import proc_stat


def sample(st: MachineState) -> Sample | None:
    """``st``'s counters now; None when its VMM does not run (or vanished meanwhile)."""
    if st.vmm_pid is None:
        return None
    pid = st.vmm_pid
    try:
        proc = proc_stat(pid)
        if proc.ended or (st.vmm_start is not None and proc.start_time != st.vmm_start):
            return None
        rss = _status_kib(pid, "VmRSS") * 1024
        io = _fields(f"/proc/{pid}/io")
    except (OSError, ValueError):
        return None
    rx, tx = _tap_bytes(st)
    return Sample(
        at=time.monotonic(), cpu_ticks=proc.cpu_ticks, rss=rss, net_rx=rx, net_tx=tx,
        block_read=io.get("read_bytes", 0), block_write=io.get("write_bytes", 0),
    )  # fmt: skip


def _fields(path: str) -> dict[str, int]:
    """``NAME: NUMBER`` lines (``/proc/PID/io``)."""
    out = {}
    with open(path, "rb") as f:
        for line in f.read().decode("ascii", "replace").splitlines():
            name, _, value = line.partition(":")
            if value.strip().isdigit():
                out[name.strip()] = int(value)
    return out


def _status_kib(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f.read().decode("ascii", "replace").splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return int(value.split()[0])
    return 0  # a kernel thread, or a process that is exiting


def _tap_bytes(st: MachineState) -> tuple[int | None, int | None]:
    """Bytes the guest received and sent (the TAP's transmitted and received ones)."""
    tap = (st.network or {}).get("tap")
    monitor = st.monitor_pid
    if not isinstance(tap, str) or monitor is None:
        return None, None
    try:
        if st.monitor_start is not None and proc_stat(monitor).start_time != st.monitor_start:
            return None, None
        with open(f"/proc/{monitor}/net/dev", "rb") as f:
            lines = f.read().decode("ascii", "replace").splitlines()[2:]
    except (OSError, ValueError):
        return None, None
    return parse_net_dev(lines, tap)


def parse_net_dev(lines: list[str], device: str) -> tuple[int | None, int | None]:
    """``(transmitted, received)`` bytes of ``device`` in ``/proc/net/dev`` lines (after
    its two header lines): what the guest on the other side of a TAP received, sent."""
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == device:
            values = counters.split()
            try:
                return int(values[8]), int(values[0])
            except (IndexError, ValueError):
                return None, None
    return None, None
