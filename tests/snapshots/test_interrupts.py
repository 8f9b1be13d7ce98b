"""Ctrl-C while a snapshot is being unmounted: the interrupt wins, nothing stays mounted."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.home import Home
from ember.snapshots import Snapshotter, loop, system
from tests.snapshots.leaks import ours

pytestmark = [pytest.mark.root, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def test_an_interrupt_during_the_unmount_does_not_abandon_it(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interrupt landed in unmount: the mount stayed, and rmdir's EBUSY replaced it."""
    snap = Snapshotter(home)
    snap.prepare("k")
    real_umount = loop.umount
    calls: list[int] = []

    def umount(target: Path, flags: int = 0) -> None:
        calls.append(flags)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C just as the unmount starts
        real_umount(target, flags)

    monkeypatch.setattr(loop, "umount", umount)
    with pytest.raises(KeyboardInterrupt), snap.mount("k") as root:
        (root / "f").write_text("x")
    assert calls == [0]
    assert ours(snap.pool.mnt) == ([], [])
    assert os.listdir(snap.pool.mnt) == []
    snap.remove("k")  # neither mounted nor held


def test_a_failed_cleanup_never_replaces_the_interrupt(
    home: Home, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the mount cannot be released, the interrupt still comes out (not an OSError or
    CommandFailed), the mount is reported, and recovery releases it later."""
    snap = Snapshotter(home)
    snap.prepare("k")

    def busy(target: Path, flags: int = 0) -> None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(loop, "umount", busy)
    monkeypatch.setattr(system.time, "sleep", lambda _s: None)  # the retries, at once
    with caplog.at_level(logging.WARNING, "ember"), pytest.raises(KeyboardInterrupt), snap.mount(
        "k"
    ):
        raise KeyboardInterrupt
    assert "cannot unmount" in caplog.text and "the next ember command" in caplog.text
    assert len(ours(snap.pool.mnt)[0]) == 1  # left as it was, for recovery
    monkeypatch.undo()
    assert any(line.startswith("unmounted") for line in snap.recover())
    assert ours(snap.pool.mnt) == ([], [])
    snap.remove("k")


# Runs `ember image prepare REF` (the CLI's own main) with two instruments: after the
# layer is applied a process sits in the mount (`cd $M && sleep`), so that the unmount
# waits for it; the first EBUSY of the unmount writes the marker.  argv: marker, REF.
_CHILD = """
import errno, os, signal, subprocess, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with it ignored
import ember.unpack
from ember.snapshots import loop
from ember.cli.main import main

marker = Path(sys.argv[1])
real_apply, real_umount = ember.unpack.LayerSession.apply, loop.umount

def apply(self, root, blob, media_type, diff_id=None, *, opener=None):
    stats = real_apply(self, root, blob, media_type, diff_id, opener=opener)
    subprocess.Popen(["sleep", "2"], cwd=root)
    return stats

def umount(target, flags=0):
    try:
        real_umount(target, flags)
    except OSError as e:
        if e.errno == errno.EBUSY and not marker.exists():
            marker.write_text("busy")
        raise

ember.unpack.LayerSession.apply = apply
loop.umount = umount
main(["image", "prepare", sys.argv[2]])
"""


def test_ctrl_c_while_a_busy_layer_disk_is_unmounted(
    home: Home, busybox_layout: Path, tmp_path: Path
) -> None:
    """QA's report: 'cannot discard failed build ...' and 'ember: Device or resource busy',
    rc 1, a mount and a loop device left; a second Ctrl-C during the cleanup too."""
    script, marker = tmp_path / "child.py", tmp_path / "busy"
    script.write_text(_CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), f"oci:{busybox_layout}:latest"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        text=True,
        env={**os.environ, "EMBER_HOME": str(home.root), "EMBER_AGENT": "0"},
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the unmount never waited for the busy mount"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # impatient: again, while the cleanup waits
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "ember: interrupted" and out == ""
    snap = Snapshotter(home, recover=False)
    assert ours(snap.pool.mnt) == ([], [])
    assert ours(snap.pool.root)[1] == []
    assert [s.name for s in snap.list()] == []  # the half-built layer was discarded
    assert json.loads(
        subprocess.run(
            [str(Path(sys.executable).parent / "ember"), "snapshot", "leases", "--json"],
            capture_output=True, text=True, check=True,
            env={**os.environ, "EMBER_HOME": str(home.root), "EMBER_AGENT": "0"},
        ).stdout  # fmt: skip
    ) == []
