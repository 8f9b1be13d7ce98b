"""The CLI's shared output helpers."""

import pytest

from ember.cli.common import print_table


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
