"""Small process-level helpers shared by the parts that fork."""

from __future__ import annotations

import ctypes

_PR_SET_PDEATHSIG = 1
# Loaded once, at import: after a fork (a preexec function, a forked relay) loading a
# library could take the dynamic loader's lock that another thread held at the fork.
_LIBC = ctypes.CDLL(None, use_errno=True)


def parent_death_signal(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when the thread that forked it
    ends (0: no longer).  Linux ties this to the *thread*, and resets it on exec of a
    set-user-ID program only."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
