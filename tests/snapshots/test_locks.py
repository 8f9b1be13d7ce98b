"""File locks never follow a symlink planted where the lock file belongs."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from ember.images.locking import file_lock
from ember.snapshots.locks import FileLock


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A lock path that is a symlink to a file that does not exist yet, outside."""
    outside = tmp_path / "outside" / "created-through-the-link"
    outside.parent.mkdir()
    lock = tmp_path / "state" / "x.lock"
    lock.parent.mkdir()
    lock.symlink_to(outside)
    return lock, outside


def test_file_lock_refuses_a_symlink(planted: tuple[Path, Path]) -> None:
    lock, outside = planted
    with pytest.raises(OSError) as err:
        FileLock(lock).acquire()
    assert err.value.errno == errno.ELOOP
    assert not outside.exists()


def test_images_lock_refuses_a_symlink(planted: tuple[Path, Path]) -> None:
    lock, outside = planted
    with pytest.raises(OSError) as err, file_lock(lock, exclusive=True):
        pass
    assert err.value.errno == errno.ELOOP
    assert not outside.exists()


def test_locks_still_work_on_plain_files(tmp_path: Path) -> None:
    with FileLock(tmp_path / "a.lock"), file_lock(tmp_path / "b.lock", exclusive=False):
        assert (tmp_path / "a.lock").is_file() and (tmp_path / "b.lock").is_file()
