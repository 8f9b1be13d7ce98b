"""What a confined VMM looks like from /proc (ember.vm.vmm.jail)."""

from __future__ import annotations

import os
import time

from ember.vm.vmm.jail import id_range


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def assert_confined(pid: int) -> int:
    """The VMM runs as a leased uid, without capabilities, under QEMU's seccomp filter and
    in a network namespace of its own; returns its uid."""
    # QEMU installs its filter early in its set-up, which may have just begun
    deadline = time.monotonic() + 10
    while proc_status(pid)["Seccomp"] == "0" and time.monotonic() < deadline:
        time.sleep(0.02)
    st = proc_status(pid)
    uids, gids = st["Uid"].split(), st["Gid"].split()
    assert len(set(uids)) == 1 and int(uids[0]) in id_range(), st["Uid"]
    assert gids == uids and st["Groups"] == "", (st["Gid"], st["Groups"])
    assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == 0, st["CapEff"]
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", (st["NoNewPrivs"], st["Seccomp"])
    assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    return int(uids[0])
