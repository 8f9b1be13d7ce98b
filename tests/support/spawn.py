"""Starting the long-lived servers tests run against (docker-registry, ``ember server``)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ember.process import parent_death_signal


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started us dies, so a
    pytest killed with -9 leaves no server behind.  (Linux ties this to the starting
    *thread*: start servers from a long-lived one.)"""
    parent_death_signal(signal.SIGTERM)


def spawn_server(
    argv: Sequence[str], log: Path, *, append: bool = False
) -> subprocess.Popen[bytes]:
    """``argv`` in its own session (a Ctrl-C in pytest must not kill it mid-test), its
    output into ``log``, ended with its parent."""
    with open(log, "ab" if append else "wb") as out:  # the child keeps its own copy
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for PDEATHSIG
        )
