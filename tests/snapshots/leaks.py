"""Finding mounts and loop devices a test left behind."""

from __future__ import annotations

import os
from pathlib import Path


def ours(prefix: Path) -> tuple[list[str], list[str]]:
    """Mount points and loop devices whose path is under ``prefix``."""
    real = os.path.realpath(prefix) + "/"
    with open("/proc/self/mountinfo") as f:
        mounts = [ln.split()[4] for ln in f if ln.split()[4].startswith(real)]
    loops = []
    for name in os.listdir("/sys/block"):
        backing = Path("/sys/block") / name / "loop" / "backing_file"
        try:
            text = backing.read_text().strip()
        except OSError:
            continue
        if text.startswith(real):
            loops.append(f"/dev/{name} {text}")
    return mounts, loops
