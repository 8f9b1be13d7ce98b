"""Whether the ember code an agent has loaded is still the code on disk.

An agent imported ember once; after an upgrade (or an edit of an editable
install) it would go on running the old code.  The agent notes every loaded
ember module file's identity when it starts and checks them again before each
command (~100 stat calls, a fraction of a millisecond); on a difference it
declines the command, which then runs in the caller with the new code, and
stops.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

Stamp = tuple[int, int, int]  # inode, size, mtime in ns


def _stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def loaded_files(package: str = "ember") -> list[str]:
    prefix = package + "."
    files = []
    for name, module in list(sys.modules.items()):
        if name == package or name.startswith(prefix):
            path = getattr(module, "__file__", None)
            if path:
                files.append(path)
    return sorted(files)


class Fingerprint:
    def __init__(self, files: Iterable[str]) -> None:
        self.stamps = {path: _stamp(path) for path in files}

    def changed(self) -> str | None:
        """The first file that changed or vanished since the fingerprint was taken."""
        for path, stamp in self.stamps.items():
            if _stamp(path) != stamp:
                return path
        return None
