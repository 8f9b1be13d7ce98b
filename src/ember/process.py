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


_MADV_POPULATE_WRITE = 23  # Linux 5.14
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_LIBC.madvise.restype = ctypes.c_int


def populate_for_writing(start: int, length: int) -> bool:
    """Fault in ``length`` bytes of this process's memory at ``start`` as writes would:
    a page shared copy-on-write with the parent gets its private copy now rather
    than at its first write.  False where the kernel declines (before Linux 5.14,
    or a range that cannot be written); the pages then fault later, as they would
    have anyway."""
    return _LIBC.madvise(start, length, _MADV_POPULATE_WRITE) == 0
