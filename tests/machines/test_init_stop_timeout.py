"""ember-init's side of ``ember stop -t``: the ``stop_timeout N`` control line, run as
PID 1 of fresh namespaces (``ember-init --test``, no VM; the harness of
tests/vm/test_init_ns.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.vm import conftest as guest_fixtures
from tests.vm import test_init_ns as init_ns
from tests.vm.test_init_ns import TRAP_LOOP, Running, sh

pytestmark = pytest.mark.root

# the guest tests' fixtures: ember-init built from init/, a copy of the busybox tree
ember_init = guest_fixtures.ember_init
busybox_rootfs = guest_fixtures.busybox_rootfs
root = init_ns.root
running = init_ns.running


def test_the_timeout_line_goes_with_the_next_stop(root: Path, running: list[Running]) -> None:
    """The guest armed its SIGKILL after the run config's stop_timeout (and said so)
    whatever `stop -t` asked for."""
    r = Running(root, sh(f"trap '' TERM; {TRAP_LOOP}"))  # stop_timeout: 10 s
    running.append(r)
    r.wait_for_line("ready")
    began = time.monotonic()
    r.control("stop_timeout x\nstop_timeout 86401\nstop_timeout 1\nstop\n")
    res = r.finish()
    assert res.returncode == 137 and time.monotonic() - began < 8
    assert "bad control request 'stop_timeout x'" in res.console
    assert "bad control request 'stop_timeout 86401'" in res.console
    assert "stop requested: sending signal 15, SIGKILL in 1s" in res.console


def test_minus_one_never_kills_and_a_plain_stop_keeps_the_configs(
    root: Path, running: list[Running]
) -> None:
    r = Running(root, sh(f"trap 'sleep 2; echo late; exit 3' TERM; {TRAP_LOOP}", stop_timeout=1))
    running.append(r)
    r.wait_for_line("ready")
    r.control("stop_timeout -1\nstop\n")
    res = r.finish()
    assert (res.returncode, res.stdout.splitlines()[-1]) == (3, "late")
    assert "sending signal 15, no SIGKILL (no timeout)" in res.console
    assert "stop timeout" not in res.console
    # an older host's plain stop: the run config's timeout
    (root / ".ember-control").unlink()
    r = Running(root, sh(f"trap '' TERM; {TRAP_LOOP}", stop_timeout=1))
    running.append(r)
    r.wait_for_line("ready")
    r.control("stop\n")
    res = r.finish()
    assert res.returncode == 137
    assert "sending signal 15, SIGKILL in 1s" in res.console
