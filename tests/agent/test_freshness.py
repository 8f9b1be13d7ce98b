"""The agent notices when the code it loaded changed on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.agent import freshness
from ember.agent.freshness import Fingerprint, loaded_files


def test_a_changed_or_removed_file_is_reported(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    fp = Fingerprint([str(a), str(b)])
    assert fp.changed() is None
    b.write_text("y = 33\n")
    assert fp.changed() == str(b)
    fp = Fingerprint([str(a)])
    a.unlink()
    assert fp.changed() == str(a)


def test_loaded_files_are_ember_modules() -> None:  # and its dependencies (below)
    files = loaded_files()
    assert any(f.endswith(os.path.join("ember", "agent", "freshness.py")) for f in files)


def test_a_file_replaced_by_rename_is_reported(tmp_path: Path) -> None:
    # pip and editors write a new file and rename it over the old one
    a = tmp_path / "a.py"
    a.write_text("x = 1\n")
    fp = Fingerprint([str(a)])
    new = tmp_path / "a.py.tmp"
    new.write_text("x = 1\n")
    os.replace(new, a)
    assert fp.changed() == str(a)


def test_a_quiet_watch_skips_the_files_own_checks(tmp_path: Path) -> None:
    # A change made through a hard link elsewhere is the one inotify does not tell
    # the file's directory of: unseen while the watch is quiet, which shows the
    # stat calls are skipped, and seen once anything there changes.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "elsewhere").mkdir()
    a = tmp_path / "pkg" / "a.py"
    a.write_text("x = 1\n")
    other = tmp_path / "elsewhere" / "a.py"
    os.link(a, other)
    fp = Fingerprint([str(a)])
    with open(other, "a") as f:
        f.write("y = 2\n")
    assert fp.changed() is None
    (tmp_path / "pkg" / "b.py").write_text("")
    assert fp.changed() == str(a)


def test_a_tree_swapped_in_above_the_files_is_reported(tmp_path: Path) -> None:
    # a release directory renamed into place, or a symlink re-pointed at another one
    for release in ("r1", "r2"):
        (tmp_path / release / "pkg").mkdir(parents=True)
        (tmp_path / release / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "current").symlink_to("r1")
    via_link = str(tmp_path / "current" / "pkg" / "a.py")
    fp = Fingerprint([via_link])
    (tmp_path / "next").symlink_to("r2")
    os.replace(tmp_path / "next", tmp_path / "current")
    assert fp.changed() == via_link
    fp = Fingerprint([str(tmp_path / "r2" / "pkg" / "a.py")])
    os.rename(tmp_path / "r2", tmp_path / "old")
    os.rename(tmp_path / "r1", tmp_path / "r2")
    assert fp.changed() == str(tmp_path / "r2" / "pkg" / "a.py")


def test_other_changes_beside_the_files_are_not_reported(tmp_path: Path) -> None:
    a = tmp_path / "a.py"
    a.write_text("x = 1\n")
    fp = Fingerprint([str(a)])
    assert fp.watching  # inotify works here: checks without a change stat nothing
    (tmp_path / "notes.txt").write_text("unrelated\n")
    assert fp.changed() is None
    assert fp.changed() is None
    a.write_text("x = 22\n")  # and a real change after them still is
    assert fp.changed() == str(a)


def test_a_change_made_during_a_check_is_seen_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = tmp_path / "a.py"
    a.write_text("x = 1\n")
    fp = Fingerprint([str(a)])
    (tmp_path / "notes.txt").write_text("")  # something changed: the next check stats
    real = freshness._stamp

    def stamp_then_change(path: str) -> freshness.Stamp | None:
        stamp = real(path)
        if path == str(a) and a.read_text() == "x = 1\n":
            a.write_text("x = 22\n")  # right after its stat, within the check
        return stamp

    monkeypatch.setattr(freshness, "_stamp", stamp_then_change)
    assert fp.changed() is None  # it was stat-ed before the change
    monkeypatch.setattr(freshness, "_stamp", real)
    assert fp.changed() == str(a)  # the change's event was left for this check


def test_a_tree_swapped_in_while_the_fingerprint_is_taken_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for release in ("r1", "r2"):
        (tmp_path / release / "pkg").mkdir(parents=True)
        (tmp_path / release / "pkg" / "a.py").write_text("x = 1\n")
    a = tmp_path / "r1" / "pkg" / "a.py"
    real = freshness._watch

    def watch_then_swap(directories: list[str]) -> int | None:
        fd = real(directories)  # on the tree that is then swapped out
        os.rename(tmp_path / "r1", tmp_path / "old")
        os.rename(tmp_path / "r2", tmp_path / "r1")
        return fd

    monkeypatch.setattr(freshness, "_watch", watch_then_swap)
    fp = Fingerprint([str(a)])
    a.write_text("x = 22\n")  # in the tree swapped in, which no watch covers
    assert fp.changed() == str(a)


def test_a_same_size_edit_in_place_with_its_mtime_put_back_is_reported(tmp_path: Path) -> None:
    """rsync --inplace, cp -p, an archive unpacked over the tree: inode, size and mtime
    all as before, the agent went on running the old code."""
    a = tmp_path / "a.py"
    a.write_text('__version__ = "0.1.0"\n')
    before = os.stat(a)
    fp = Fingerprint([str(a)])
    with open(a, "r+") as f:
        f.write('__version__ = "0.1.9"\n')
    os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert fp.changed() == str(a)


def test_a_file_changed_as_the_agent_started_counts_as_changed(tmp_path: Path) -> None:
    """A module replaced between its import and the stamps (an upgrade writing files
    as a restarted agent imports them) was stamped as it is now: the agent served the
    code it had imported before, until some other file changed."""
    a = tmp_path / "a.py"
    a.write_text("x = 1\n")
    changed_ns = os.stat(a).st_ctime_ns
    # a process that began before the change (or within the slack after it)
    assert Fingerprint([str(a)], started_ns=changed_ns - 1).changed() == str(a)
    assert Fingerprint([str(a)], started_ns=changed_ns + freshness.START_SLACK_NS // 2).changed() == str(a)
    # one that began well after it imported what is there
    assert Fingerprint([str(a)], started_ns=changed_ns + 2 * freshness.START_SLACK_NS).changed() is None


def test_this_process_began_before_now_on_the_file_clock(tmp_path: Path) -> None:
    import time

    started = freshness.process_started_ns()
    assert started is not None and started <= time.time_ns()
    (tmp_path / "f").write_text("")
    assert os.stat(tmp_path / "f").st_ctime_ns >= started - freshness.START_SLACK_NS


def test_the_dependencies_installed_beside_ember_are_fingerprinted() -> None:
    """An upgrade of click or httpx (a security fix) was never noticed: only ember's own
    files were fingerprinted."""
    import click

    files = loaded_files()
    assert click.__file__ in files
    assert os.__file__ not in files  # the standard library is the interpreter's
    dirs = tuple(freshness.package_dirs())
    assert all("ember" in f or f.startswith(dirs) for f in files)
