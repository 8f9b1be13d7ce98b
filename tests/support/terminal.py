"""Running a command on a pseudo-terminal, as a user at a terminal would."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from collections.abc import Mapping, Sequence

_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def read_terminal(master: int) -> bytes:
    """What a child drew on the pseudo-terminal ``master`` until it closed it."""
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    return drawn


def on_terminal(
    argv: Sequence[str], env: Mapping[str, str], *, stream: str = "stdout", timeout: float = 120
) -> tuple[int, str]:
    """Run ``argv`` with its ``stream`` ("stdout" or "stderr") on a pseudo-terminal (the
    other one piped); its exit status and what it drew there, as text (escape
    sequences kept: ``plain`` drops them)."""
    master, slave = pty.openpty()
    other = subprocess.PIPE
    proc = subprocess.Popen(
        argv,
        stdout=slave if stream == "stdout" else other,
        stderr=slave if stream == "stderr" else other,
        env=dict(env),
    )
    os.close(slave)
    drawn = read_terminal(master)
    proc.communicate(timeout=timeout)
    os.close(master)
    return proc.returncode, drawn.decode(errors="replace")


def plain(text: str) -> str:
    """``text`` without its terminal control sequences."""
    return _ESCAPES.sub("", text)
