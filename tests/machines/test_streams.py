"""The monitor's copy loop on real FIFOs, with a real writer process in the VMM's place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ember.machines.logs import LogConfig, log_files
from ember.machines.streams import STATUS_LIMIT, StreamPump, fifo_channels
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


def _run(d: Path, n: int, config: LogConfig) -> None:
    Channels.in_dir(d).precreate()
    pump = StreamPump.create(d, config)
    assert pump.channels == fifo_channels(d)
    try:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(n)])
        pid_fd = os.pidfd_open(proc.pid)
        try:
            pump.run_until_exit(pid_fd)
        finally:
            os.close(pid_fd)
        assert proc.wait() == 0
    finally:
        pump.close()


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
