"""Ctrl-C and SIGTERM during ``ember run``'s start-up leave either a started machine or
nothing; ``ember start`` of a running machine attaches (``-a``) or is a no-op.

The interrupt is raised at a chosen point (a patched function raises it, as the signal
handler would there) rather than sent after a guessed delay: the windows are a few
milliseconds wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.machines.vmkit import Ember, vm_home_fixture, wait_for
from tests.support.proc import poll_until

pytestmark = [pytest.mark.vm, pytest.mark.root]

vm_home = vm_home_fixture("vmintr")

# `ember ARGS...` with one function replaced by one that raises what SIGINT (or SIGTERM)
# would have raised at that point
INTERRUPTED_AT = r"""
import importlib, sys
module, attr, what = sys.argv[1:4]
from ember.cli.main import Terminated, main
owner, _, name = attr.rpartition(".")
target = importlib.import_module(module)
holder = getattr(target, owner) if owner else target
real = getattr(holder, name)
exc = Terminated if what == "TERM" else KeyboardInterrupt

def interrupted(*args, **kwargs):
    raise exc()

setattr(holder, name, classmethod(lambda cls, *a, **k: interrupted()) if owner else interrupted)
main(sys.argv[4:])
"""


def machines_and_disks(ember: Ember) -> list[str]:
    found = [p.name for p in ember.home.machines.glob("*") if not p.name.startswith(".")]
    pool = ember.home.snapshots / "pool"
    found += [str(p) for p in pool.rglob("machine%2F*")]
    state = ember.home.root / "net" / "state.json"
    if state.exists():
        found += [f"net {m}" for m in json.loads(state.read_text()).get("machines", {})]
    found += [ln for ln in ember.sh("ip", "-o", "link").stdout.splitlines() if "em-" in ln]
    return found


@pytest.mark.parametrize("what", ["INT", "TERM"])
def test_an_interrupt_between_create_and_the_hand_over_leaves_nothing(
    ember: Ember, busybox: str, what: str
) -> None:
    """The foreground run opens the logs after ``create`` and before the monitor has the
    machine: an interrupt there removed nothing (a ``--rm`` machine stuck in Created
    with its TAP, address and root disk)."""
    res = subprocess.run(
        ["ip", "netns", "exec", ember.netns, sys.executable, "-c", INTERRUPTED_AT,
         "ember.machines.logs", "LogFollower.current", what, "run", "--rm", busybox, "true"],
        capture_output=True, text=True, env=ember.env(), timeout=180,
    )  # fmt: skip
    assert res.returncode == (143 if what == "TERM" else 130), res.stderr
    assert machines_and_disks(ember) == []


def test_a_machine_whose_run_was_killed_after_creating_it_starts(
    ember: Ember, busybox: str
) -> None:
    """A run killed (SIGKILL: nothing can clean up) between create and the hand-over:
    the record names the run's monitor, gone with it, so the machine reads as ended and
    `start` runs it, as docker start runs a container its killed `docker run` made."""
    res = subprocess.run(
        ["ip", "netns", "exec", ember.netns, sys.executable, "-c",
         INTERRUPTED_AT.replace("raise exc()", "import os; os._exit(9)"),
         "ember.machines.logs", "LogFollower.current", "INT", "run", "--name", "orphan",
         busybox, "sh", "-c", "echo ran; exit 3"],
        capture_output=True, text=True, env=ember.env(), timeout=180,
    )  # fmt: skip
    assert res.returncode == 9, res.stderr
    try:
        start = ember("start", "-a", "orphan")
        assert (start.returncode, start.stdout) == (3, "ran\n"), start.stderr
    finally:
        assert ember("rm", "-f", "orphan").returncode == 0
    assert machines_and_disks(ember) == []


def test_start_of_a_machine_its_run_never_finished_making_says_what_to_do(
    ember: Ember, busybox: str
) -> None:
    """A run killed in the middle of create (its network being set up): the first record
    is there, without disk or network; `start` says to remove it, and `rm -f` frees
    what the create had made."""
    res = subprocess.run(
        ["ip", "netns", "exec", ember.netns, sys.executable, "-c",
         INTERRUPTED_AT.replace("raise exc()", "import os; os._exit(9)"),
         "ember.machines.lifecycle", "_setup_network", "INT", "run", "--name", "half",
         busybox, "true"],
        capture_output=True, text=True, env=ember.env(), timeout=180,
    )  # fmt: skip
    assert res.returncode == 9, res.stderr
    try:
        start = ember("start", "half")
        assert start.returncode == 1, start.stderr
        assert "never completely made" in start.stderr and "ember rm -f half" in start.stderr
    finally:
        assert ember("rm", "-f", "half").returncode == 0
    assert machines_and_disks(ember) == []


def test_start_of_a_running_machine_attaches_or_is_a_no_op(ember: Ember, busybox: str) -> None:
    # "late" comes long after "early": the attach below, made once "early" is in the
    # logs (the guest's boot takes seconds, and varies), is made before "late" is out
    ember("run", "-d", "--name", "live", busybox, "sh", "-c",
          "echo early; sleep 15; echo late; echo to-err >&2; exit 5", check=True)  # fmt: skip
    try:
        wait_for(ember, "live", lambda st: st["status"] == "running")
        plain = ember("start", "live")  # docker start of a running container: its name
        assert (plain.returncode, plain.stdout) == (0, "live\n"), plain.stderr
        # "early" is out before we attach
        poll_until(lambda: "early" in ember("logs", "live").stdout, "no early in the logs", 120)
        attached = ember("start", "-a", "live")
        assert attached.returncode == 5, attached.stderr
        assert attached.stdout == "late\n"
        assert "to-err" in attached.stderr
    finally:
        ember("rm", "-f", "live")
    assert machines_and_disks(ember) == []


def test_a_start_killed_before_the_hand_over_leaves_a_machine_that_starts_again(
    ember: Ember, busybox: str
) -> None:
    """`ember start` killed (SIGKILL) after preparing the record and before its monitor
    had the machine: the record said created with no monitor, and every later start said
    to `rm -f` it, root disk and all."""
    ember("run", "-d", "--name", "ks", busybox, "true", check=True)
    try:
        wait_for(ember, "ks", lambda s: s["status"] == "exited")
        res = subprocess.run(
            ["ip", "netns", "exec", ember.netns, sys.executable, "-c",
             INTERRUPTED_AT.replace("raise exc()", "import os; os._exit(9)"),
             "ember.machines.lifecycle", "MonitorHandle.hand_over", "INT", "start", "ks"],
            capture_output=True, text=True, env=ember.env(), timeout=180,
        )  # fmt: skip
        assert res.returncode == 9, res.stderr
        # the monitor it had started ends once it sees its starter gone (its go pipe
        # closed); a start while it still lives is refused as "being started", rightly
        from ember.machines.lifecycle import monitor_alive
        from ember.machines.state import read_state
        from ember.machines.store import MachineStore

        store = MachineStore(ember.home)
        d = store.dir(store.find("ks").id)
        poll_until(lambda: not monitor_alive(read_state(d)), "the killed start's monitor lingered", 60)
        again = ember("start", "ks")
        assert again.returncode == 0, again.stderr
        st = wait_for(ember, "ks", lambda s: s["status"] == "exited")
        assert st["exit_code"] == 0, st
    finally:
        assert ember("rm", "-f", "ks").returncode == 0
    assert machines_and_disks(ember) == []
