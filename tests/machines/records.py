"""Machine records as ember writes them, for tests that make one without a VM."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ember.machines import state as mstate
from ember.net.manager import MachineNetwork
from ember.net.ports import PortMapping
from ember.process import proc_start_time


def network_json(ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A record's ``network`` section, from ``MachineNetwork.to_json`` itself, with
    ``ports`` (as ``PortMapping.to_json`` writes them)."""
    return MachineNetwork(
        machine_id="0" * 64, tap="em-000000000000", mac="02:00:0a:58:00:02",
        network="default", guest_ip="10.88.0.2", gateway="10.88.0.1", prefix=24, mtu=1500,
        ports=tuple(PortMapping.from_json(p) for p in ports or []),
    ).to_json()  # fmt: skip


#: a stand-in for a machine's monitor (``start_stoppable_monitor``)
_STOPPABLE_MONITOR = """
import shutil, sys, time
from pathlib import Path
from ember.machines import state as mstate
d, removes = Path(sys.argv[1]), sys.argv[2] == "rm"
while not mstate.read_state(d).stopped_by_user:
    time.sleep(0.02)
if removes:
    shutil.rmtree(d)
else:
    with mstate.update(d) as cur:
        cur.status, cur.exit_code, cur.finished_at = mstate.EXITED, 143, mstate.now()
"""


@contextmanager
def stoppable_monitor(machine_dir: Path, *, removes: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """A process named in the machine's record as its monitor, which, once the record
    says the user stopped the machine, records the run's end and exits, as the monitor
    does when the guest has ended (``removes``: deletes the machine instead, as the
    monitor of a ``--rm`` machine does).  Killed on the way out if it still runs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _STOPPABLE_MONITOR, str(machine_dir), "rm" if removes else "-"]
    )
    try:
        with mstate.update(machine_dir) as cur:
            cur.monitor_pid, cur.monitor_start = proc.pid, proc_start_time(proc.pid)
        yield proc
    finally:
        proc.kill()
        proc.wait()
