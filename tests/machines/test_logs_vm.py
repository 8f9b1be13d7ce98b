"""Capped logs with real boots: a guest printing far more than the cap, followed by the
foreground ``ember run``, then ``ember logs``, ``ember rm`` and ``--rm``.

Each boot costs seconds under TCG: two boots, several checks each."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.home import Home
from ember.snapshots.pool import close_pool
from tests.machines.vmkit import EMBER, Ember, make_vm_home

pytestmark = [pytest.mark.vm, pytest.mark.root]

CAP = 64 << 10
FILES = 2
LINES = 8000
PAD = "p" * 30
# ~360 KB on stdout (more than twice what a stream keeps), every 10th line on stderr
FLOOD = (
    f'i=0; while [ $i -lt {LINES} ]; do echo "line $i {PAD}"; '
    '[ $((i % 10)) -eq 0 ] && echo "err $i" >&2; i=$((i+1)); done; exit 0'
)


@pytest.fixture(scope="module")
def vm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    home = make_vm_home(tmp_path_factory.mktemp("vmlogs") / "home")
    config = json.loads(home.config_file.read_text())
    config["logs"] = {"max_size": "64K", "max_files": FILES}
    home.config_file.write_text(json.dumps(config))
    yield home
    close_pool(home)


def iso_ns(text: str) -> int:
    """Unix ns of an RFC 3339 time as ember prints them (nanoseconds, or fewer digits)."""
    from ember.machines.logtimes import parse_when

    return parse_when(text, 0)


def numbers(text: str, word: str) -> list[int]:
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith(word + " ")]


YES = "y" * 29
BURST = 6_000_000


def test_flood_is_capped_and_followed_in_order(ember: Ember, busybox: str) -> None:
    # numbered lines one write each, then a burst as fast as the guest can print
    # (the attached ember run must not fall out of the two 64K files kept)
    script = f"{FLOOD.removesuffix('; exit 0')}; yes {YES} | head -c {BURST}; echo; echo end"
    res = ember("run", "--name", "flood", busybox, "sh", "-c", script, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    # the foreground run received every byte, in order, though the logs rotated
    lines = "".join(f"line {i} {PAD}\n" for i in range(LINES))
    burst = ((YES + "\n") * (BURST // len(YES) + 1))[:BURST]
    expected = lines + burst + "\nend\n"
    assert len(res.stdout) == len(expected)
    assert res.stdout == expected
    assert numbers(res.stderr, "err") == list(range(0, LINES, 10))

    d = Path(ember.inspect("flood")["dir"])
    names = sorted(p.name for p in d.iterdir())
    for stream in ("stdout", "stderr", "console"):
        files = [d / n for n in names if n == f"{stream}.log" or n.startswith(f"{stream}.log.")]
        assert sum(p.stat().st_size for p in files) <= CAP * FILES, files
        assert all(p.stat().st_size <= CAP for p in files)
    assert "stdout.log.1" in names and "stdout.log.2" not in names
    assert not [n for n in names if n.endswith(".fifo")], names

    # ember logs: the rotated file, then the current one: the newest bytes, in order
    logs = ember("logs", "flood", check=True)
    kept = (d / "stdout.log.1").read_bytes() + (d / "stdout.log").read_bytes()
    assert logs.stdout.encode() == kept
    assert CAP < len(kept) <= CAP * FILES
    assert expected.endswith(logs.stdout)
    assert numbers(logs.stderr, "err") == list(range(0, LINES, 10))  # stderr did not rotate

    # the monitor dated what it wrote: each kept file has its marks, within the cap with it
    for p in (d / "stdout.log.1", d / "stdout.log", d / "stderr.log"):
        marks = d / f".{p.name.split('.log')[0]}.log.times.{p.stat().st_ino}"
        assert marks.stat().st_size > 0 and p.stat().st_size + marks.stat().st_size <= CAP
    ran = ember.inspect("flood")
    started, ended = (iso_ns(ran[k]) for k in ("started_at", "finished_at"))
    dated = ember("logs", "-t", "flood", check=True)
    stamps = [line.split(" ", 1) for line in dated.stdout.splitlines()]
    assert "".join(f"{rest}\n" for _, rest in stamps) == logs.stdout
    times = [iso_ns(t) for t, _ in stamps]
    assert times == sorted(times) and started - 10**9 <= times[0] and times[-1] <= ended + 10**9
    assert ember("logs", "--since", "0s", "flood", check=True).stdout == ""
    assert ember("logs", "--until", stamps[0][0], "flood", check=True).stdout.startswith(stamps[0][1])

    ember("rm", "flood", check=True)
    assert not d.exists()
    assert ember("ps", "-a", "-q").stdout == ""


def test_logs_follow_across_rotation_and_rm_leaves_nothing(ember: Ember, busybox: str) -> None:
    # sleep first: `logs -f` must find the machine before --rm removes it
    res = ember("run", "-d", "--rm", "--name", "flood-rm", busybox, "sh", "-c",
                f"sleep 4; {FLOOD}")  # fmt: skip
    assert res.returncode == 0, res.stderr
    machine_id = res.stdout.strip()
    d = ember.home.machines / machine_id
    follow = subprocess.run(
        ["ip", "netns", "exec", ember.netns, EMBER, "logs", "-f", "flood-rm"],
        capture_output=True, text=True, timeout=600, env=ember.env(),
    )  # fmt: skip
    assert follow.returncode == 0, follow.stderr
    # it started before the program printed: every line, across the rotations
    assert numbers(follow.stdout, "line") == list(range(LINES))
    assert numbers(follow.stderr, "err") == list(range(0, LINES, 10))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and d.exists():
        time.sleep(0.2)
    assert not d.exists()
    assert [p.name for p in ember.home.machines.iterdir() if not p.name.startswith(".")] == []


def test_a_stalled_reader_loses_nothing_when_the_guest_powers_off(
    ember: Ember, busybox: str
) -> None:
    """The foreground reader stops reading while the guest prints more than the monitor
    holds back (4 MiB) plus the FIFO (1 MiB) and the logs (2 x 64 KiB), so the program
    blocks until the reader comes back, and then exits: what QEMU was still holding for
    the guest must reach the reader, not die with the VM (the monitor says "bye" only
    once it took everything the exit report counts; ember-init waits for that before
    powering off).  The output must exceed those buffers: a program that finished while
    the reader was stalled would leave the monitor waiting for the reader at most
    DRAIN_WAIT_S (10 s) before dropping rotated files (seen once under a full run's load,
    with ~4.7 MB: exactly two 64 KiB files lost)."""
    count = 1_000_000  # `seq` lines: ~6.9 MB
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ember.netns, EMBER, "run", "--name", "stalled", busybox,
         "seq", "1", str(count)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ember.env(),
    )  # fmt: skip
    try:
        time.sleep(12)  # the reader stalls: the guest fills everything behind it
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    numbers = out.split()
    assert len(numbers) == count, f"{count - len(numbers)} lines lost"
    assert numbers[-1] == str(count).encode()
    # the guest powered off on the monitor's "bye", not after waiting it out
    machine = ember.inspect("stalled")["id"]
    console = (ember.home.machines / machine / "console.log").read_text()
    assert "exit code 0" in console and "no bye from the host" not in console
    assert ember("rm", "stalled").returncode == 0
