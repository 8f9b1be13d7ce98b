"""The agent notices when the code it loaded changed on disk."""

from __future__ import annotations

import os
from pathlib import Path

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


def test_loaded_files_are_ember_modules() -> None:
    files = loaded_files()
    assert any(f.endswith(os.path.join("ember", "agent", "freshness.py")) for f in files)
    assert all("ember" in f for f in files)


def test_a_file_replaced_by_rename_is_reported(tmp_path: Path) -> None:
    # pip and editors write a new file and rename it over the old one
    a = tmp_path / "a.py"
    a.write_text("x = 1\n")
    fp = Fingerprint([str(a)])
    new = tmp_path / "a.py.tmp"
    new.write_text("x = 1\n")
    os.replace(new, a)
    assert fp.changed() == str(a)


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
