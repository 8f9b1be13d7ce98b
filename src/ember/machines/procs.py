"""Identifying processes across ember invocations (pid reuse safe)."""

from __future__ import annotations


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: with the pid, it identifies one process (no pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None
