"""The monitor's copy loop on real FIFOs, with a real writer process in the VMM's place."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ember.machines import streams
from ember.machines.logs import LogConfig, LogFollower, log_files
from ember.machines.streams import DRAIN_WAIT_S, STATUS_LIMIT, StreamPump, fifo_channels
from ember.vm.vmm.base import Channels

# opens the FIFOs by name the way QEMU's file chardev does (O_WRONLY|O_APPEND), writes
# numbered lines to stdout/stderr/console, a flood to the status port, then exits
WRITER = r"""
import os, sys
d = sys.argv[1]
n = int(sys.argv[2])
fds = {name: os.open(os.path.join(d, name + ".fifo"), os.O_WRONLY | os.O_APPEND)
       for name in ("stdout", "stderr", "console", "status")}
def put(fd, data):
    while data:
        data = data[os.write(fd, data):]
put(fds["status"], b'{"exit_code": 3}\n' + b"x" * 200000)
for i in range(n):
    put(fds["stdout"], b"out %06d %s\n" % (i, b"o" * (i % 50)))
    if i % 3 == 0:
        put(fds["stderr"], b"err %06d\n" % i)
put(fds["console"], b"ember-init: exit code 3\n")
"""


def _lines(path: Path) -> list[bytes]:
    return b"".join(p.read_bytes() for p in log_files(path)).splitlines()


def _pump_writer(
    d: Path,
    writer: str,
    *args: str,
    config: LogConfig | None = None,
    on_drained: Callable[[], None] | None = None,
) -> None:
    """Run ``writer`` (a Python script given ``d`` and ``args``) in the VMM's place while
    a pump copies the FIFOs, until it exits (it must exit 0)."""
    Channels.in_dir(d).precreate()
    pump = StreamPump.create(d, config or LogConfig(1 << 20, 2))
    assert pump.channels == fifo_channels(d)
    try:
        proc = subprocess.Popen([sys.executable, "-c", writer, str(d), *args])
        pid_fd = os.pidfd_open(proc.pid)
        try:
            pump.run_until_exit(pid_fd, on_drained=on_drained)
        finally:
            os.close(pid_fd)
        assert proc.wait() == 0, "the writer failed (or was never told bye)"
    finally:
        pump.close()


def _run(d: Path, n: int, config: LogConfig) -> None:
    _pump_writer(d, WRITER, str(n), config=config)


def test_pump_caps_every_stream_and_drains_after_the_writer_exits(tmp_path: Path) -> None:
    cap = 16 << 10
    n = 20000  # ~1.2 MB on stdout: far more than a FIFO holds, so the writer blocks on us
    _run(tmp_path, n, LogConfig(cap, 3))
    logs = Channels.in_dir(tmp_path)
    for path in (logs.stdout_log, logs.stderr_log, logs.console_log):
        files = log_files(path)
        assert 1 <= len(files) <= 3
        assert all(p.stat().st_size <= cap for p in files)
    out = _lines(logs.stdout_log)
    # the newest lines, contiguous, up to the very last one (drained after the exit)
    numbers = [int(line.split()[1]) for line in out]
    assert numbers == list(range(n - len(numbers), n))
    assert len(out) > 2 * cap // 100
    err = [int(line.split()[1]) for line in _lines(logs.stderr_log)]
    assert err == list(range(err[0], n, 3)) and err[-1] == (n - 1) // 3 * 3
    assert logs.console_log.read_bytes() == b"ember-init: exit code 3\n"
    status = logs.status_file.read_bytes()
    assert len(status) == STATUS_LIMIT and status.startswith(b'{"exit_code": 3}\n')
    # the FIFOs are gone once the pump is closed
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".fifo") == []


def test_pump_keeps_everything_under_the_cap(tmp_path: Path) -> None:
    _run(tmp_path, 300, LogConfig(1 << 20, 2))
    logs = Channels.in_dir(tmp_path)
    assert log_files(logs.stdout_log) == [logs.stdout_log]
    assert [int(line.split()[1]) for line in _lines(logs.stdout_log)] == list(range(300))


FLOOD = r"""
import os, sys
fd = os.open(os.path.join(sys.argv[1], "stdout.fifo"), os.O_WRONLY | os.O_APPEND)
data = b"".join(b"%07d flood\n" % i for i in range(int(sys.argv[2])))
while data:
    data = data[os.write(fd, data[:65536]):]
"""


def _flood_lines(n: int) -> bytes:
    return b"".join(b"%07d flood\n" % i for i in range(n))


def _flood(d: Path, n: int, follower: LogFollower, reader: Callable[[], None], wait: float) -> None:
    """The pump in a thread, a writer process flooding stdout, ``reader`` in another thread."""
    pump = StreamPump.create(d, LogConfig(4096, 2))
    t = threading.Thread(target=reader)
    t.start()
    try:
        proc = subprocess.Popen([sys.executable, "-c", FLOOD, str(d), str(n)])
        pid_fd = os.pidfd_open(proc.pid)
        try:
            pump.run_until_exit(pid_fd, drain_wait=wait)
        finally:
            os.close(pid_fd)
        assert proc.wait() == 0
    finally:
        pump.close()
        t.join(60)
        follower.close()


@pytest.mark.parametrize("hold_limit", [streams.HOLD_LIMIT, 8192])
def test_attached_reader_misses_nothing_however_far_behind(
    tmp_path: Path, hold_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer floods ~40 files' worth, the attached reader is slow, two files are
    kept: the monitor holds the output back (in memory, then by not reading the FIFO,
    which blocks the writer) rather than drop what the reader has not read."""
    monkeypatch.setattr(streams, "HOLD_LIMIT", hold_limit)
    n = 12000
    want = _flood_lines(n)  # ~170 KB: ~40 files of 4 KiB
    got = bytearray()
    logs = Channels.in_dir(tmp_path)
    logs.precreate()
    follower = LogFollower.current(logs.stdout_log, hold=True)  # before the writer starts

    def slow_reader() -> None:
        deadline = time.monotonic() + 90
        while len(got) < len(want) and time.monotonic() < deadline:
            data = follower.read(3000)
            got.extend(data)
            time.sleep(0.002 if data else 0.01)

    _flood(tmp_path, n, follower, slow_reader, DRAIN_WAIT_S)
    assert bytes(got) == want
    files = log_files(logs.stdout_log)
    assert len(files) == 2 and all(p.stat().st_size <= 4096 for p in files)


def test_stalled_attached_reader_does_not_hang_the_drain(tmp_path: Path) -> None:
    """A reader that never reads (a suspended ``ember run``): once the VMM has exited
    the monitor waits ``drain_wait`` at most, then rotates anyway, within the cap."""
    n = 3000  # 36 KB: it all fits in the FIFO, so the writer can exit while held back
    logs = Channels.in_dir(tmp_path)
    logs.precreate()
    follower = LogFollower.current(logs.stdout_log, hold=True)
    _flood(tmp_path, n, follower, lambda: None, 0.3)
    files = log_files(logs.stdout_log)
    kept = b"".join(p.read_bytes() for p in files)
    assert _flood_lines(n).endswith(kept) and kept.endswith(b"%07d flood\n" % (n - 1))
    assert len(files) == 2 and all(p.stat().st_size <= 4096 for p in files)


# a guest that prints, reports, and then waits (like ember-init) until told "bye"
FAREWELL_WRITER = r"""
import os, sys, time
d = sys.argv[1]
fds = {name: os.open(os.path.join(d, name + ".fifo"), os.O_WRONLY | os.O_APPEND)
       for name in ("stdout", "status")}
for i in range(1000):
    os.write(fds["stdout"], b"line %d\n" % i)
os.write(fds["status"], b'{"exit_code": 0}\n')
for i in range(1000, 1100):  # still in flight after the report
    os.write(fds["stdout"], b"line %d\n" % i)
bye = os.path.join(d, "bye")
deadline = time.monotonic() + 20
while not os.path.exists(bye) and time.monotonic() < deadline:
    time.sleep(0.005)
sys.exit(0 if os.path.exists(bye) else 9)
"""


def _lines_at_bye(d: Path, writer: str) -> list[int]:
    """Run ``writer`` in the VMM's place; the stdout log's line count each time the
    monitor let the guest go (the writer exits once it sees the bye)."""
    calls: list[int] = []

    def bye() -> None:
        calls.append(len(Channels.in_dir(d).stdout_log.read_bytes().splitlines()))
        (d / "bye").touch()

    _pump_writer(d, writer, on_drained=bye)
    return calls


def test_the_guest_is_let_go_once_after_its_report_and_the_fifos_ran_dry(tmp_path: Path) -> None:
    # everything the guest wrote before and after its report is in the log by then
    assert _lines_at_bye(tmp_path, FAREWELL_WRITER) == [1100]


COUNTING_WRITER = r"""
import os, sys, time
d = sys.argv[1]
fds = {name: os.open(os.path.join(d, name + ".fifo"), os.O_WRONLY | os.O_APPEND)
       for name in ("stdout", "stderr", "status")}
lines = [b"line %d\n" % i for i in range(1100)]
err = b"one error\n"
os.write(fds["stderr"], err)
for line in lines[:1000]:
    os.write(fds["stdout"], line)
# the report counts everything; the last 100 lines are held up well past QUIET_S, as
# QEMU may hold them on a loaded host
os.write(fds["status"], b'{"exit_code": 0, "sent": [%d, %d]}\n' % (sum(map(len, lines)), len(err)))
time.sleep(0.5)
for line in lines[1000:]:
    os.write(fds["stdout"], line)
bye = os.path.join(d, "bye")
deadline = time.monotonic() + 20
while not os.path.exists(bye) and time.monotonic() < deadline:
    time.sleep(0.005)
sys.exit(0 if os.path.exists(bye) else 9)
"""


def test_a_guest_that_counts_its_output_is_let_go_only_once_all_of_it_came(
    tmp_path: Path,
) -> None:
    # not 1000: a quiet FIFO is not the end when the guest counted
    assert _lines_at_bye(tmp_path, COUNTING_WRITER) == [1100]


VMM_WRITER = r"""
import os, sys
fd = os.open(os.path.join(sys.argv[1], "vmm.fifo"), os.O_WRONLY | os.O_APPEND)
data = b"".join(b"qemu-system-x86_64: warning %06d\n" % i for i in range(4000))
while data:
    data = data[os.write(fd, data):]
"""


def test_the_vmms_own_output_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "VMM_LOG_LIMIT", 4096)
    _pump_writer(tmp_path, VMM_WRITER)  # it opens vmm.fifo by name: there before the VMM
    kept = (tmp_path / "vmm.log").read_bytes()
    assert len(kept) == 4096  # of ~140 KB
    assert kept.startswith(b"qemu-system-x86_64: warning 000000\n")
    assert not streams.vmm_fifo(tmp_path).exists()


def test_the_console_says_when_a_restored_guest_took_its_config(tmp_path: Path) -> None:
    """A monitor that gave up waiting for a restored guest's "ok" booted the machine
    again when its program had printed nothing yet: a program that started late ran
    twice.  ember-init says on the console that it took the config, which the monitor
    reads whatever became of its connection (a marker split across writes too)."""
    from ember.machines.streams import RESTORE_TAKEN

    for said, taken in ((b"[ 1.2] some kernel warning\n", False),
                        (b"noise " + RESTORE_TAKEN + b"\n", True)):  # fmt: skip
        d = tmp_path / str(taken)
        d.mkdir()
        Channels.in_dir(d).precreate()
        pump = StreamPump.create(d, LogConfig(1 << 20, 2))
        pump.watch_restore = True  # (the monitor's, while it hands a restored guest its config)
        try:
            assert not pump.config_taken()
            fd = os.open(d / "console.fifo", os.O_WRONLY | os.O_APPEND)
            try:
                half = len(said) - 10
                os.write(fd, said[:half])
                pump.pump(next(f for f in pump.fds() if pump._by_fd[f].fifo.name == "console.fifo"))
                os.write(fd, said[half:])
                assert pump.config_taken() is taken
            finally:
                os.close(fd)
        finally:
            pump.close()
