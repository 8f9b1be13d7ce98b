"""``ember-init --ps`` (what ``ember top`` runs in the guest), run here against the host's
own /proc: the fields of processes this test knows."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.cli.execcmd import TOP_COLUMNS, parse_ps, top_table


def _ps(ember_init: Path) -> dict[int, list[str]]:
    out = subprocess.run([str(ember_init), "--ps"], check=True, capture_output=True, text=True).stdout
    return {int(row[1]): row for row in parse_ps(out)}


def _name(pid: int) -> str:
    return f"[{Path(f'/proc/{pid}/comm').read_text().strip()}]"


def test_it_lists_processes_with_docker_tops_fields(ember_init: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(100)", "two\targs\nhere"])
    try:
        rows = _ps(ember_init)
        mine = rows[os.getpid()]
        assert mine[0] == pwd.getpwuid(os.getuid()).pw_name
        assert mine[2] == str(os.getppid())
        assert len(mine[4]) == 5 and mine[4][2] == ":"  # started today: HH:MM
        assert mine[6].count(":") == 2  # its CPU time, hh:mm:ss
        row = rows[child.pid]
        # arguments joined by spaces, control characters shown as "?"
        assert row[2] == str(os.getpid())
        assert row[7] == f"{sys.executable} -c import time; time.sleep(100) two?args?here"
        assert 1 not in rows and 2 not in rows  # init, kthreadd: neither the program's nor a command's
        assert all(r[7] for r in rows.values())  # kernel threads have no command line: left out
    finally:
        child.kill()
        child.wait()


def test_a_huge_command_line_is_shown_as_the_name(ember_init: Path) -> None:
    """More than 256 KiB of arguments: the process's name in brackets, as ps shows one
    whose command line it cannot give (it was left out of the list)."""
    huge = ["x" * 100_000] * 3
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(100)", *huge])
    try:
        deadline = time.monotonic() + 10
        # The name is read each round: Popen returns once the child's exec has let go of
        # the parent's memory, a moment before the kernel gives it its new name (CI once
        # read "pytest", the name the child had from its parent).
        while (row := _ps(ember_init).get(child.pid)) is None or row[7] != _name(child.pid):
            seen = None if row is None else (len(row[7]), row[7][:80])
            assert time.monotonic() < deadline, (_name(child.pid), seen)
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()


def test_names_and_commands_cannot_pass_for_rows(ember_init: Path, tmp_path: Path) -> None:
    """A guest's /etc/passwd name with a tab or a carriage return, and a command line with
    Unicode line breaks, are what a tenant controls: neither may forge or hide a row."""
    passwd = tmp_path / "passwd"
    forged = "x\rroot\t4242\t1\t0\tDec01\t?\t0\tFAKE-PROC"
    passwd.write_text(f"{forged}:x:0:0::/root:/bin/sh\n")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(100)", "a\u2028b\u0085c"])
    try:
        # the tool as the guest runs it: with the image's /etc/passwd
        out = subprocess.run(
            ["unshare", "-m", "sh", "-c", 'mount --bind "$1" /etc/passwd && exec "$2" --ps', "-",
             str(passwd), str(ember_init)],
            check=True, capture_output=True,
        ).stdout.decode()  # fmt: skip
        rows = {int(r[1]): r for r in parse_ps(out)}
        assert 4242 not in rows and all("FAKE" not in " ".join(r) for r in rows.values())
        assert rows[os.getpid()][0] == "0"  # the number, not that name
        assert rows[child.pid][7].endswith("a???b??c")
        # and the host splits lines at "\n" only, taking only rows with numbers
        assert parse_ps("root\t1\t0\t0\tx\t?\t0\tone\u2028two\nroot\tX\t0\t0\tx\t?\t0\tbad\n") == [
            ["root", "1", "0", "0", "x", "?", "0", "one\\u2028two"]
        ]
    finally:
        child.kill()
        child.wait()


def test_it_is_a_tool_not_pid_1(ember_init: Path) -> None:
    """Anything else but ``--ps`` alone, run outside PID 1, is refused as before."""
    r = subprocess.run([str(ember_init), "--ps", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "must run as PID 1" in r.stderr


def test_top_table_lays_out_as_docker_top() -> None:
    rows = parse_ps("root\t7\t1\t0\t10:00\t?\t00:00:01\tsleep 600\nbroken line\n")
    assert rows == [["root", "7", "1", "0", "10:00", "?", "00:00:01", "sleep 600"]]
    text = top_table(rows)
    head, line = text.splitlines()
    assert head.split() == list(TOP_COLUMNS) and head.index("PID") == 20 and head.index("CMD") == 140
    assert line.index("7") == 20 and line.endswith("00:00:01" + " " * 12 + "sleep 600")


pytestmark = pytest.mark.filterwarnings("error")
