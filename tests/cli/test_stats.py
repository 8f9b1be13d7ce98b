"""``ember stats`` on machine records whose VMM is a real process (no VM)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.home import Home
from ember.machines import state as mstate
from ember.machines.state import MachineState, VMConfig
from ember.machines.store import MachineStore
from ember.process import proc_start_time
from tests.machines.records import network_json
from tests.support.cli import EMBER, ember_env, run_ember


@pytest.fixture
def vmm() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _record(home: Home, name: str, **kw: object) -> MachineState:
    st = MachineState(
        id=secrets.token_hex(32), name="", image="x", image_digest="sha256:" + "0" * 64,
        created_at=mstate.now(), command=["true"], config={},
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 256, 1), **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    MachineStore(home).create(st, name)
    return st


def _stats(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_ember("stats", "--no-stream", *args, env=ember_env(home), timeout=60)


def test_stats_of_a_running_machine_and_with_all_a_stopped_one(tmp_path: Path, vmm: int) -> None:
    home = Home(tmp_path)
    up = _record(home, "up", status=mstate.RUNNING, started_at=mstate.now(),
                 vmm_pid=vmm, vmm_start=proc_start_time(vmm), network={**network_json(), "tap": "lo"},
                 monitor_pid=os.getpid(), monitor_start=proc_start_time(os.getpid()))  # fmt: skip
    _record(home, "down", status=mstate.EXITED, exit_code=0, finished_at=mstate.now())
    res = _stats(tmp_path)
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert re.split(r"\s{2,}", header) == ["MACHINE ID", "NAME", "CPU %", "MEM USAGE / LIMIT",
                                          "MEM %", "NET I/O", "BLOCK I/O", "PIDS"]  # fmt: skip
    (row,) = rows
    cells = re.split(r"\s{2,}", row)
    assert cells[:2] == [up.id[:12], "up"]
    assert float(cells[2].rstrip("%")) > 10  # a busy loop: most of one CPU
    assert cells[3].endswith(" / 256MiB") and cells[7] == "--"
    everything = _stats(tmp_path, "-a", "--format", "{{.Name}} {{.CPUPerc}} {{.MemUsage}}")
    down, running = everything.stdout.splitlines()  # newest first, as ps
    assert down == "down 0.00% 0B / 256MiB" and running.startswith("up "), everything.stderr
    as_json = [json.loads(line) for line in _stats(tmp_path, "--format", "json").stdout.splitlines()]
    assert [j["Name"] for j in as_json] == ["up"]
    assert set(as_json[0]) == {"Container", "ID", "Name", "CPUPerc", "MemUsage", "MemPerc",
                               "NetIO", "BlockIO", "PIDs"}  # fmt: skip


def test_stats_of_named_machines_says_each_missing_one(tmp_path: Path) -> None:
    home = Home(tmp_path)
    _record(home, "down", status=mstate.EXITED, exit_code=0, finished_at=mstate.now())
    res = _stats(tmp_path, "down", "nope")
    assert res.returncode == 0 and res.stdout.splitlines()[1].split()[1] == "down", res.stderr
    assert res.stderr == "ember: no such machine: nope\n"
    none = _stats(tmp_path, "nope")
    assert none.returncode == 1 and none.stdout == ""
    bad = _stats(tmp_path, "--format", "{{.Nope}}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_streamed_machine_is_looked_up_again_each_second(tmp_path: Path, vmm: int) -> None:
    """A restarted machine (another VMM) shows its new VMM's figures, not its old one's."""
    home = Home(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    st = _record(home, "up", status=mstate.RUNNING, started_at=mstate.now(),
                 vmm_pid=gone.pid, vmm_start=1, network={**network_json(), "tap": "lo"},
                 monitor_pid=os.getpid(), monitor_start=proc_start_time(os.getpid()))  # fmt: skip
    proc = subprocess.Popen([EMBER, "stats", "--format", "{{.Name}} {{.CPUPerc}}", "up"],
                            env=ember_env(tmp_path), stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "up 0.00%\n"  # its VMM is gone
        with mstate.update(MachineStore(home).dir(st.id)) as cur:  # `ember restart`
            cur.vmm_pid, cur.vmm_start = vmm, proc_start_time(vmm)
        for _ in range(10):
            line = proc.stdout.readline()
            if line != "up 0.00%\n":
                break
        name, cpu = line.split()
        assert name == "up" and (cpu == "--" or float(cpu.rstrip("%")) > 10), line
    finally:
        proc.kill()
        proc.wait()
