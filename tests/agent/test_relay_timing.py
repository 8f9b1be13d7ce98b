"""When the agent forks the relay for the next command (Agent._wait_for_need)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
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


@pytest.fixture
def stop() -> Iterator[tuple[int, int]]:
    """The agent's stop pipe (read end, write end)."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def _busy_relay(seconds: str) -> Iterator[int]:
    """A pidfd of a process standing for the relay serving a command."""
    proc = subprocess.Popen(["sleep", seconds])
    pidfd = os.pidfd_open(proc.pid)
    try:
        yield pidfd
    finally:
        os.close(pidfd)
        proc.kill()
        proc.wait()


@pytest.fixture
def busy() -> Iterator[int]:
    yield from _busy_relay("60")


@pytest.fixture
def ending() -> Iterator[int]:
    yield from _busy_relay("0.2")


def _waited(listener: socket.socket, busy: int, stop_r: int) -> float:
    start = time.monotonic()
    Agent._wait_for_need(listener, busy, stop_r)
    return time.monotonic() - start


def test_the_next_relay_is_forked_when_a_caller_waits(
    listener: socket.socket, busy: int, stop: tuple[int, int]
) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(listener.getsockname())
    assert _waited(listener, busy, stop[0]) < DELAY / 3


def test_the_next_relay_is_forked_when_the_command_ends(
    listener: socket.socket, ending: int, stop: tuple[int, int]
) -> None:
    assert _waited(listener, ending, stop[0]) < DELAY / 3


def test_a_stop_while_waiting_stops_the_agent(
    listener: socket.socket, busy: int, stop: tuple[int, int]
) -> None:
    os.write(stop[1], b"\x0f")
    with pytest.raises(server._Stop):
        Agent._wait_for_need(listener, busy, stop[0])
