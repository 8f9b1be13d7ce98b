"""``ember stats``'s figures (pure) and their reading from /proc (real processes)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ember.machines import state as mstate
from ember.machines.state import MachineState, VMConfig
from ember.machines.stats import Sample, Usage, binary_size, columns, decimal_size, usage
from ember.machines.statsprobe import parse_net_dev, sample
from ember.process import parse_proc_stat, proc_start_time


@pytest.mark.parametrize(
    ("n", "binary", "decimal"),
    [
        (0, "0B", "0B"),
        (648, "648B", "648B"),
        (1208, "1.18KiB", "1.21kB"),
        (int(150.3 * (1 << 20)), "150.3MiB", "158MB"),
        (512 << 20, "512MiB", "537MB"),
        (3 << 30, "3GiB", "3.22GB"),
    ],
)
def test_sizes_are_written_as_dockers(n: int, binary: str, decimal: str) -> None:
    assert (binary_size(n), decimal_size(n)) == (binary, decimal)


def test_cpu_is_a_percentage_of_one_cpu_over_the_time_between_two_samples() -> None:
    before = Sample(10.0, 1000, 0, 0, 0, 0, 0)
    now = Sample(12.0, 1300, 150 << 20, 2048, 1000, 4096, 0)
    u = usage(before, now, memory_limit=512 << 20, ticks_per_second=100)
    assert u.cpu_percent == pytest.approx(150.0)  # 3 s of CPU in 2 s: one and a half CPUs
    assert columns(u) == {
        "CPUPerc": "150.00%", "MemUsage": "150MiB / 512MiB", "MemPerc": "29.30%",
        "NetIO": "2.05kB / 1kB", "BlockIO": "4.1kB / 0B", "PIDs": "--",
    }  # fmt: skip
    first = usage(None, now, memory_limit=512 << 20, ticks_per_second=100)
    assert first.cpu_percent is None and columns(first)["CPUPerc"] == "--"
    stopped = columns(Usage.stopped(512 << 20))
    assert (stopped["CPUPerc"], stopped["MemUsage"], stopped["NetIO"]) == ("0.00%", "0B / 512MiB", "0B / 0B")
    unknown = usage(None, Sample(1.0, 0, 0, None, None, 0, 0), memory_limit=1, ticks_per_second=100)
    assert columns(unknown)["NetIO"] == "-- / --"


def test_net_dev_lines_give_what_the_guest_behind_a_tap_received_and_sent() -> None:
    lines = [
        "    lo:  100       1    0    0    0     0          0         0   100       1    0    0    0     0       0          0",
        "tap-ab12: 5000    40    0    0    0     0          0         0  7000      50    0    0    0     0       0          0",
    ]  # fmt: skip
    assert parse_net_dev(lines, "tap-ab12") == (7000, 5000)
    assert parse_net_dev(lines, "tap-none") == (None, None)
    assert parse_net_dev(["tap-x: 1 2"], "tap-x") == (None, None)


def test_proc_stat_gives_user_and_system_time() -> None:
    line = b"42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 70 0 0 20 0 1 0 12345 1000 10"
    got = parse_proc_stat(line)
    assert (got.cpu_ticks, got.start_time, got.ppid) == (320, 12345, 1)


@pytest.fixture
def busy() -> Iterator[subprocess.Popen[bytes]]:
    """A process that uses CPU and memory: the machine's VMM, for /proc's sake."""
    proc = subprocess.Popen([sys.executable, "-c",
                             "b = bytearray(64 << 20)\nwhile True: b[0] = (b[0] + 1) % 256"])  # fmt: skip
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _machine(vmm_pid: int, vmm_start: int | None, tap: str = "lo") -> MachineState:
    return MachineState(
        id=secrets.token_hex(32), name="m", image="x", image_digest="sha256:" + "0" * 64,
        created_at=mstate.now(), command=["true"], config={},
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1),
        network={"tap": tap}, status=mstate.RUNNING, vmm_pid=vmm_pid, vmm_start=vmm_start,
        monitor_pid=os.getpid(), monitor_start=proc_start_time(os.getpid()),
    )  # fmt: skip


def test_a_sample_reads_the_vmm_and_its_tap(busy: subprocess.Popen[bytes]) -> None:
    import time

    st = _machine(busy.pid, proc_start_time(busy.pid))
    first = sample(st)
    time.sleep(0.5)
    second = sample(st)
    assert first is not None and second is not None
    assert second.cpu_ticks > first.cpu_ticks
    assert second.rss >= 64 << 20
    u = usage(first, second, memory_limit=512 << 20, ticks_per_second=os.sysconf("SC_CLK_TCK"))
    assert u.cpu_percent is not None and u.cpu_percent > 20
    # "lo" stands in for the TAP: its counters, read from the monitor's namespace
    assert second.net_rx is not None and second.net_tx is not None
    assert sample(_machine(busy.pid, proc_start_time(busy.pid), tap="no-such-dev")).net_rx is None  # type: ignore[union-attr]


def test_a_pid_that_is_not_the_recorded_vmm_is_not_read(busy: subprocess.Popen[bytes]) -> None:
    start = proc_start_time(busy.pid)
    assert start is not None
    assert sample(_machine(busy.pid, start + 1)) is None  # another process with that pid
    busy.kill()
    busy.wait()
    assert sample(_machine(busy.pid, start)) is None
