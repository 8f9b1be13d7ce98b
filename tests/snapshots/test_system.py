"""ember.snapshots.system: what a failed tool's output is reduced to."""

from __future__ import annotations

import sys

import pytest

from ember.snapshots.errors import CommandFailed
from ember.snapshots.system import last_words, run

RESIZE2FS_100T = """resize2fs 1.47.0 (5-Feb-2023)
resize2fs: New size results in too many block group descriptors.

Please run 'e2fsck -fy disk.ext4' to fix the filesystem
after the aborted resize operation.
"""


def test_a_tools_own_words_are_kept_over_its_advice() -> None:
    """--disk-size 100T said "cannot resize disk.ext4: after the aborted resize
    operation." (resize2fs's last line, which reads as a damaged disk)."""
    assert last_words("/sbin/resize2fs", RESIZE2FS_100T) == (
        "resize2fs: New size results in too many block group descriptors."
    )
    assert last_words("mkfs.ext4", "a\nthe reason\n\n") == "the reason"
    assert last_words("x", "") is None


def test_a_silent_failure_names_its_status() -> None:
    with pytest.raises(CommandFailed, match=r"^probing: exit status 3$"):
        run([sys.executable, "-c", "raise SystemExit(3)"], "probing")
