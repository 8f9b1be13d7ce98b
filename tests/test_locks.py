"""ember.locks: flocks that never follow a symlink planted where the lock file belongs."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from ember.locks import FileLock, is_held, try_lock, waiting_message
from tests.support.proc import wait_flock_blocked


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A lock path that is a symlink to a file that does not exist yet, outside."""
    outside = tmp_path / "outside" / "created-through-the-link"
    outside.parent.mkdir()
    lock = tmp_path / "state" / "x.lock"
    lock.parent.mkdir()
    lock.symlink_to(outside)
    return lock, outside


@pytest.mark.parametrize("shared", [False, True])
def test_a_lock_refuses_a_symlink(planted: tuple[Path, Path], shared: bool) -> None:
    lock, outside = planted
    with pytest.raises(OSError) as err:
        FileLock(lock, shared=shared).acquire()
    assert err.value.errno == errno.ELOOP
    assert not outside.exists()


def test_try_lock_refuses_a_symlink(planted: tuple[Path, Path]) -> None:
    lock, outside = planted
    with pytest.raises(OSError) as err:
        try_lock(lock)
    assert err.value.errno == errno.ELOOP
    assert not outside.exists()


def test_locks_work_on_plain_files(tmp_path: Path) -> None:
    with FileLock(tmp_path / "a.lock"), FileLock(tmp_path / "b.lock", shared=True):
        assert (tmp_path / "a.lock").is_file() and (tmp_path / "b.lock").is_file()
    assert oct((tmp_path / "a.lock").stat().st_mode & 0o777) == oct(0o600)


def test_shared_locks_go_together_and_keep_an_exclusive_one_out(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with FileLock(path, shared=True):
        second = try_lock(path, shared=True)
        assert second is not None
        second.release()
        assert try_lock(path) is None
    exclusive = try_lock(path)
    assert exclusive is not None
    assert try_lock(path, shared=True) is None
    exclusive.release()


def test_try_lock_in_a_directory_that_is_gone_is_none_and_makes_nothing(tmp_path: Path) -> None:
    assert try_lock(tmp_path / "removed" / "lock") is None
    assert not (tmp_path / "removed").exists()


def test_a_waiter_is_told_then_gets_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    told: list[str] = []
    waiting = threading.Event()

    def notice(line: str) -> None:
        told.append(line)
        waiting.set()

    holder = FileLock(path)
    holder.acquire()
    got = threading.Event()

    def wait_for_it() -> None:
        with FileLock(path, shared=True, notice=notice):
            got.set()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    try:
        assert waiting.wait(10)
        assert not got.is_set()
    finally:
        holder.release()
    waiter.join(10)
    assert got.is_set() and told == [waiting_message(path)]


def test_a_free_lock_is_taken_without_a_notice(tmp_path: Path) -> None:
    told: list[str] = []
    with FileLock(tmp_path / "x.lock", notice=told.append):
        pass
    assert told == []


def test_a_waiter_never_holds_a_lock_its_holder_unlinked(tmp_path: Path) -> None:
    """The holder deletes the file as it lets go: the waiter must end up locking the
    file at the path now (a new one), not the deleted one it waited on, or a third
    process locking the path would believe it holds the lock too."""
    path = tmp_path / "x.lock"
    holder = FileLock(path, unlink_on_release=True)
    holder.acquire()
    waiting = threading.Event()
    waiter = FileLock(path, notice=lambda _: waiting.set())
    thread = threading.Thread(target=waiter.acquire)
    thread.start()
    assert waiting.wait(10)
    wait_flock_blocked(path, os.getpid())  # from its notice to blocking on the file again
    holder.release()
    thread.join(10)
    held = os.fstat(waiter.fd)
    assert held.st_nlink == 1 and held.st_ino == os.stat(path).st_ino  # not the deleted one
    assert try_lock(path) is None
    waiter.release()


def test_a_forked_child_that_releases_its_copy_leaves_the_parent_holding(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = FileLock(path)
    lock.acquire()
    pid = os.fork()
    if pid == 0:
        lock.release()
        os._exit(0)
    os.waitpid(pid, 0)
    assert try_lock(path) is None
    lock.release()
    free = try_lock(path)
    assert free is not None
    free.release()


def test_is_held_only_looks(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    assert not is_held(path) and not path.exists()  # makes no lock file
    with FileLock(path):
        assert is_held(path)
    assert not is_held(path)
    with FileLock(path):  # the look dropped its own lock: a holder gets it again
        pass
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")  # cannot tell: leave alone what it guards
    assert is_held(path) and not (tmp_path / "elsewhere").exists()
