from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from ember.home import Home
from ember.machines import state as mstate
from ember.machines.errors import (
    AmbiguousMachine,
    InvalidOption,
    MachineError,
    MachineNotFound,
    NameInUse,
)
from ember.machines.state import MachineState, VMConfig
from ember.machines.store import MachineStore


def make_state(machine_id: str | None = None) -> MachineState:
    return MachineState(
        id=machine_id or secrets.token_hex(32),
        name="",
        image="oci:/x:latest",
        image_digest="sha256:" + "0" * 64,
        created_at=mstate.now(),
        command=["sh"],
        config={"stop_timeout": 10},
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1),
    )


def test_create_find_list_remove(tmp_path: Path) -> None:
    store = MachineStore(Home(tmp_path))
    a = make_state("ab" + "0" * 62)
    b = make_state("ac" + "0" * 62)
    store.create(a, "alpha")
    store.create(b, None)
    assert b.name and b.name != "alpha"
    assert store.find("alpha").id == a.id
    assert store.find(a.id).name == "alpha"
    assert store.find("ab").id == a.id
    with pytest.raises(AmbiguousMachine):
        store.find("a")
    with pytest.raises(MachineNotFound):
        store.find("nope")
    with pytest.raises(MachineNotFound):
        store.find("ff")
    assert {m.id for m in store.list()} == {a.id, b.id}
    with pytest.raises(NameInUse):
        store.create(make_state(), "alpha")
    with pytest.raises(InvalidOption):
        store.create(make_state(), "bad/name")
    store.remove_dir(a.id)
    store.remove_dir(a.id)  # idempotent
    assert [m.id for m in store.list()] == [b.id]
    store.create(make_state(), "alpha")  # the name is free again


def test_state_round_trip_and_update(tmp_path: Path) -> None:
    store = MachineStore(Home(tmp_path))
    st = make_state()
    d = store.create(st, "rt")
    with mstate.update(d) as cur:
        cur.status, cur.exit_code, cur.vmm_pid = mstate.EXITED, 3, 1234
    back = mstate.read_state(d)
    assert (back.status, back.exit_code, back.vmm_pid, back.vm.memory_mib) == (
        "exited",
        3,
        1234,
        512,
    )
    assert MachineState.from_json(back.to_json()) == back


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    store = MachineStore(Home(tmp_path))
    st = make_state()
    d = store.create(st, "c")
    (d / "state.json").write_text("{not json")
    with pytest.raises(MachineError, match="unreadable"):
        mstate.read_state(d)
    (d / "state.json").write_text('{"id": "x"}')
    with pytest.raises(MachineError):
        mstate.read_state(d)


def test_dir_refuses_hostile_ids(tmp_path: Path) -> None:
    store = MachineStore(Home(tmp_path))
    for bad in ("../etc", "a" * 63, "A" * 64, ""):
        with pytest.raises(MachineNotFound):
            store.dir(bad)


ABANDON = """
import json, sys
from pathlib import Path
from ember.home import Home
from ember.machines import lifecycle, state as mstate
from ember.machines.store import MachineStore
from ember.net.manager import NetworkManager
from ember.net.ports import parse_publish
home = Home(Path(sys.argv[1]))
st = MachineStore(home).find(sys.argv[2])
NetworkManager(home).setup(st.id, ports=parse_publish("8080:80"))
lifecycle.abandon_start(home, st, "no monitor")
print(json.dumps({"state": mstate.read_state(MachineStore(home).dir(st.id)).to_json(),
                  "networks": list(NetworkManager(home).machines())}))
"""


def test_a_start_no_monitor_took_is_recorded_and_its_network_freed(tmp_path: Path) -> None:
    """What `ember start` does when its monitor does not take the machine."""
    import json
    import subprocess
    import sys

    from tests.machines.vmkit import delete_netns, new_netns

    home = Home(tmp_path)
    st = make_state()
    store = MachineStore(home)
    store.create(st, "again")
    netns = new_netns()
    try:
        res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", ABANDON,
                              str(tmp_path), st.id], capture_output=True, text=True)  # fmt: skip
    finally:
        delete_netns(netns)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    got = out["state"]
    assert (got["status"], got["exit_code"], got["error"]) == ("exited", 125, "no monitor")
    assert got["end_reason"] and got["finished_at"]
    assert out["networks"] == []
