"""The CLI's shared output helpers."""

import os
import sys

import pytest

from ember.cli.common import print_table
from tests.support.terminal import on_terminal, plain


def test_a_table_on_a_pipe_is_plain_aligned_and_never_cut(capsys: pytest.CaptureFixture[str]) -> None:
    long_ref = "oci:/" + "d" * 150 + ":latest"
    print_table(("NAME", "SIZE"), [(long_ref, "1.0 MiB"), ("busybox", "")])
    out = capsys.readouterr().out.splitlines()
    width = len(long_ref) + 2
    assert out == [
        "NAME".ljust(width) + "SIZE",
        long_ref + "  1.0 MiB",
        "busybox",  # trailing blanks dropped
    ]


def test_an_empty_table_is_its_header(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(("VERSION", "DEFAULT"), [])
    assert capsys.readouterr().out == "VERSION  DEFAULT\n"


def test_a_table_on_a_narrow_terminal_cuts_no_name() -> None:
    """rich fitted every table to the terminal by ending cells with "…" (the snapshot,
    organization, token and kernel listings, and `ember ps`): two names that differ only
    at the end then read the same.  Only the last column may wrap."""
    names = ["x" * 60 + "-one", "x" * 60 + "-two"]
    code = (
        "from ember.cli.common import print_table; "
        f"print_table(('NAME', 'SIZE', 'STATUS'), [(n, '1.0 MiB', 'Up 5 minutes') for n in {names!r}])"
    )
    env = {**os.environ, "COLUMNS": "40", "TERM": "xterm"}
    status, drawn = on_terminal([sys.executable, "-c", code], env)
    assert status == 0
    text = plain(drawn)
    assert "…" not in text
    for name in names:
        assert name in text
    assert "1.0 MiB" in text


@pytest.mark.parametrize(
    ("tz", "when", "shown"),
    [
        # Go's zero time (crane's for an image built without one): an OverflowError in
        # any zone west of UTC, and year 1 printed as "1"
        ("America/New_York", "0001-01-01T00:00:00Z", "0001-01-01 00:00:00 +0000 UTC"),
        ("Asia/Tokyo", "9999-12-31T23:59:59Z", "9999-12-31 23:59:59 +0000 UTC"),
        ("UTC", "2026-11-30T12:00:00Z", "2026-11-30 12:00:00 +0000 UTC"),
        ("UTC", "not a time", "not a time"),
    ],
)
def test_go_time(monkeypatch: pytest.MonkeyPatch, tz: str, when: str, shown: str) -> None:
    import time

    from ember.cli.common import go_time

    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        assert go_time(when) == shown
    finally:
        monkeypatch.undo()
        time.tzset()
