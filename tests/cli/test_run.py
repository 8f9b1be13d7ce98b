"""Pieces of ``ember run`` that need no VM (the VM runs are in tests/integration)."""

from __future__ import annotations

import json
import os
import secrets
import threading
from typing import Any

import pytest

from ember.cli.run import _await_start, _read_line
from ember.machines import state as mstate
from ember.machines.errors import MachineError
from ember.machines.state import MachineState, VMConfig


def test_the_monitors_first_line_is_read_whole_however_long() -> None:
    """One 4 KB read took a long error message (a long kernel path) in half: json.loads
    of it was a traceback."""
    message = json.dumps({"event": "error", "message": "kernel " + "/k" * 5000 + " missing"})
    r, w = os.pipe()

    def write_slowly() -> None:
        data = (message + "\n{}\n").encode()
        for i in range(0, len(data), 3000):
            os.write(w, data[i : i + 3000])
        os.close(w)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    try:
        assert json.loads(_read_line(r)) == json.loads(message)
    finally:
        writer.join()
        os.close(r)


def test_a_monitor_that_says_nothing_gives_an_empty_line() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        assert _read_line(r) == b""
    finally:
        os.close(r)


def _machine() -> MachineState:
    return MachineState(
        id=secrets.token_hex(32), name="m1", image="oci:/x:latest",
        image_digest="sha256:" + "0" * 64, created_at=mstate.now(), command=["true"],
        config={}, vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1),
    )  # fmt: skip


def _events(*events: dict[str, Any]) -> int:
    r, w = os.pipe()
    os.write(w, b"".join(json.dumps(e).encode() + b"\n" for e in events))
    os.close(w)
    return r


def test_detached_start_returns_once_started() -> None:
    r = _events({"event": "started", "vmm_pid": 1}, {"event": "exited", "exit_code": 0})
    try:
        _await_start(_machine(), r)
    finally:
        os.close(r)


def test_a_vm_that_ended_before_it_started_fails_with_the_vmms_words() -> None:
    """`run -d` printed the id and exited 0 when QEMU died at once: the monitor's
    "started" came before QEMU failed.  Now the end comes first, with its reason."""
    reason = "vmm exited with status 1: qemu-system-x86_64: could not open disk image"
    r = _events({"event": "exited", "exit_code": 255, "end_reason": reason})
    try:
        with pytest.raises(MachineError, match="m1 did not start: vmm exited with status 1: qemu"):
            _await_start(_machine(), r)
    finally:
        os.close(r)
    r = _events()
    try:
        with pytest.raises(MachineError, match="did not start: monitor died"):
            _await_start(_machine(), r)
    finally:
        os.close(r)
