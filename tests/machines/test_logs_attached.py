"""The attached reader (``ember run`` in the foreground, ``start -a``) gets every byte
however small the logs' cap, however long it takes to read a backlog after the VMM's
exit, and even when the logs are deleted (``--rm``) right after the monitor is done."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from ember.machines.logs import LogConfig, LogFollower, RotatingLog
from ember.machines.streams import StreamPump
from ember.vm.vmm.base import Channels
from tests.machines.test_streams import FLOOD, _flood_lines


def test_a_steady_reader_slower_than_the_drain_wait_gets_everything_even_with_rm(
    tmp_path: Path,
) -> None:
    """~170 KB through 4 KiB files (two kept), a reader that needs ~1.5 s for it, a
    monitor that waits 0.3 s for a *stalled* reader: the reader is not stalled, so it
    gets everything; and the machine's directory deleted as soon as the monitor is
    done (what ``--rm`` does) costs it nothing either."""
    d = tmp_path / "machine"
    d.mkdir()
    n = 12000
    want = _flood_lines(n)
    logs = Channels.in_dir(d)
    logs.precreate()
    follower = LogFollower.current(logs.stdout_log, hold=True)  # before the writer starts
    got = bytearray()
    done = threading.Event()

    def steady_reader() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            data = follower.read(1200)
            got.extend(data)
            if not data and done.is_set():
                return
            time.sleep(0.01)

    pump = StreamPump.create(d, LogConfig(4096, 2))
    t = threading.Thread(target=steady_reader)
    t.start()
    try:
        proc = subprocess.Popen([sys.executable, "-c", FLOOD, str(d), str(n)])
        pid_fd = os.pidfd_open(proc.pid)
        try:
            began = time.monotonic()
            pump.run_until_exit(pid_fd, drain_wait=0.3)
            took = time.monotonic() - began
        finally:
            os.close(pid_fd)
        assert proc.wait() == 0
    finally:
        pump.close()
        shutil.rmtree(d)  # --rm: the monitor removes the machine right after
        done.set()
        t.join(60)
        follower.close()
    assert len(got) == len(want)
    assert bytes(got) == want
    assert took > 0.6, "the reader was not slower than the drain wait: no test"


def test_files_behind_counts_what_the_attached_reader_has_not_opened(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    path.touch()
    log = RotatingLog(path, LogConfig(4096, 3))
    line = b"x" * 99 + b"\n"
    assert log.files_behind() == 0  # no reader
    with LogFollower.current(path, hold=True) as follower:
        assert log.files_behind() == 0  # it holds the current file
        log.write(line * 41)  # one rotation: its file is .1 now
        assert log.files_behind() == 1
        log.write(line * 41)  # its file is .2
        assert log.files_behind() == 1
        while follower.read(1 << 16):
            pass
        assert log.files_behind() == 0  # it went on to the current file
    log.close()
