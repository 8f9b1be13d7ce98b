"""Machines' QEMUs are confined (ember.vm.vmm.jail): real machines through the ``ember``
CLI, restored from a template, as a tenant runs them.

One module, few machines: the template is of a shape of its own (``-m 320``), so that
it is built by this code (its initrd readable by the VMMs) whatever the shared kernel
cache holds from earlier runs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.machines.vmkit import Ember, built_template, vm_home_fixture, wait_for
from tests.vm.vmm.confined import assert_confined

pytestmark = [pytest.mark.vm, pytest.mark.root]

MEMORY = "320"

vm_home = vm_home_fixture("vmjail")


def vmm_of(ember: Ember, name: str) -> dict[str, Any]:
    return wait_for(ember, name, lambda st: st["status"] == "running" and st["vmm_pid"])


def as_uid(monitor_pid: int, uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``uid`` in the machine's mount namespace (where its snapshot pool is)."""
    return subprocess.run(
        ["nsenter", "-t", str(monitor_pid), "-m", "setpriv", f"--reuid={uid}", f"--regid={uid}",
         "--clear-groups", *argv],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_restored_machines_run_confined_and_apart(ember: Ember, busybox: str) -> None:
    state = built_template(ember, busybox, "-m", MEMORY)
    # readable by the VMMs as it is: no restore copies it into memory
    assert state.with_suffix(".initrd").stat().st_mode & 0o004
    machines = {}
    for name in ("jail-a", "jail-b"):
        res = ember("run", "-d", "--name", name, "-m", MEMORY, busybox, "sleep", "120")
        assert res.returncode == 0, res.stderr
        st = vmm_of(ember, name)
        assert st["vm"]["restore"] == str(state), "the machine did not start from the template"
        machines[name] = (st, assert_confined(st["vmm_pid"]))
    (a, uid_a), (b, uid_b) = machines["jail-a"], machines["jail-b"]
    assert uid_a != uid_b, "two machines' VMMs share a uid"
    assert "memfd:" not in " ".join(
        str(p.readlink()) for p in Path(f"/proc/{a['vmm_pid']}/fd").iterdir()
    )
    # an escaped VMM of jail-a can read neither jail-b's disk nor its directory, nor
    # the template's memory
    assert state.stat().st_mode & 0o077 == 0
    for argv in (["head", "-c1", b["vm"]["root_disk"]], ["ls", str(ember.home.machines / b["id"])],
                 ["head", "-c1", str(state)]):
        res = as_uid(a["monitor_pid"], uid_a, *argv)
        assert res.returncode != 0 and "Permission denied" in res.stderr, (argv, res)
    # and the machines still stop and die as they did
    assert ember("stop", "jail-a").returncode == 0
    assert ember("kill", "jail-b").returncode == 0
    ended = {n: wait_for(ember, n, lambda st: st["status"] == "exited") for n in machines}
    assert ended["jail-a"]["exit_code"] == 143 and ended["jail-b"]["exit_code"] == 137, ended
    for name in machines:
        assert ember("rm", name).returncode == 0
