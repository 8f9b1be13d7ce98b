"""ember.fsutil: the helpers every area shares."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.fsutil import NotRegularFile, atomic_write, open_regular, why_unopened


def test_open_regular_refuses_what_is_not_a_file_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading without O_NONBLOCK waits for a writer
    for path in (fifo, tmp_path, Path("/dev/null")):
        with pytest.raises(NotRegularFile) as e:
            open_regular(path)
        assert e.value.filename == os.fspath(path) and e.value.strerror == "not a regular file"
        assert why_unopened(e.value) == "is not a regular file"
    with pytest.raises(FileNotFoundError) as missing:
        open_regular(tmp_path / "missing")
    assert why_unopened(missing.value) == "does not exist"
    assert why_unopened(PermissionError(13, "Permission denied")) == "cannot be read (Permission denied)"
    atomic_write(tmp_path / "f", b"data")
    with open_regular(tmp_path / "f") as f:
        assert f.read() == b"data"
