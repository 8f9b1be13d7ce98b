"""When the agent forks the relay for the next command (Agent._wait_for_need)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ember.agent import server
from ember.agent.server import Agent

#: far longer than any wait below: a wake-up that comes is not the timeout's
DELAY = 30.0


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    monkeypatch.setattr(server, "NEXT_RELAY_DELAY", DELAY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "s"))
    sock.listen(8)
    return sock


def _waited(listener: socket.socket, busy: int, stop_r: int) -> float:
    start = time.monotonic()
    Agent._wait_for_need(listener, busy, stop_r)
    return time.monotonic() - start


def test_the_next_relay_is_forked_when_a_caller_waits(listener: socket.socket) -> None:
    busy = subprocess.Popen(["sleep", "60"])
    pidfd, (stop_r, stop_w) = os.pidfd_open(busy.pid), os.pipe()
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(listener.getsockname())
        assert _waited(listener, pidfd, stop_r) < DELAY / 3
    finally:
        busy.kill()
        busy.wait()
        for fd in (pidfd, stop_r, stop_w):
            os.close(fd)


def test_the_next_relay_is_forked_when_the_command_ends(listener: socket.socket) -> None:
    busy = subprocess.Popen(["sleep", "0.2"])
    pidfd, (stop_r, stop_w) = os.pidfd_open(busy.pid), os.pipe()
    try:
        assert _waited(listener, pidfd, stop_r) < DELAY / 3
    finally:
        busy.wait()
        for fd in (pidfd, stop_r, stop_w):
            os.close(fd)


def test_a_stop_while_waiting_stops_the_agent(listener: socket.socket) -> None:
    busy = subprocess.Popen(["sleep", "60"])
    pidfd, (stop_r, stop_w) = os.pidfd_open(busy.pid), os.pipe()
    try:
        os.write(stop_w, b"\x0f")
        with pytest.raises(server._Stop):
            Agent._wait_for_need(listener, pidfd, stop_r)
    finally:
        busy.kill()
        busy.wait()
        for fd in (pidfd, stop_r, stop_w):
            os.close(fd)
