"""The template builder's own QEMU (the builder boots and saves it as root)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from ember.vm.kernel import KernelInfo
from ember.vm.template import TemplateShape
from ember.vm.vmm.qemu import find_qemu
from tests.support.proc import child_pids

pytestmark = [pytest.mark.root, pytest.mark.integration]


def test_a_killed_builder_takes_its_qemu_with_it(kernel: KernelInfo, tmp_path: Path) -> None:
    """Review finding: the builder's QEMU (root, no filter, the caller's environment)
    outlived a builder killed with -9 for ever, and the next run started another."""
    initrd = tmp_path / "base.cpio"
    initrd.write_bytes(b"")  # QEMU runs a while before the guest finds nothing in it
    shape = TemplateShape(kernel.vmlinux, initrd, "tcg", 128, 1, (), 0, find_qemu())
    builder = subprocess.Popen(
        [sys.executable, "-m", "ember.vm.template"], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={"EMBER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "SECRET": "x"},
    )  # fmt: skip
    assert builder.stdin is not None
    builder.stdin.write(json.dumps(asdict(shape), default=str).encode())
    builder.stdin.close()
    qemu: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not qemu:
            assert builder.poll() is None, "the builder ended before its QEMU was seen"
            assert time.monotonic() < deadline, "the builder never started QEMU"
            qemu = [p for p in child_pids(builder.pid)
                    if Path(f"/proc/{p}/comm").read_text().startswith("qemu")]  # fmt: skip
            time.sleep(0.02)
        env = Path(f"/proc/{qemu[0]}/environ").read_bytes().split(b"\0")
        assert b"SECRET=x" not in env and b"EMBER_HOME" not in b"".join(env), env
        builder.send_signal(signal.SIGKILL)
        builder.wait()
        deadline = time.monotonic() + 10
        while True:
            try:
                state = Path(f"/proc/{qemu[0]}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                break
            if state == "Z":
                break  # dead, its reaper not yet there
            assert time.monotonic() < deadline, "the builder's QEMU outlived it"
            time.sleep(0.05)
    finally:
        builder.kill()
        for pid in qemu:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
