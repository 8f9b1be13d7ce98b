from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytest

from ember.home import Home
from ember.machines import state as mstate
from ember.machines.errors import (
    AmbiguousMachine,
    DamagedMachine,
    InvalidOption,
    MachineError,
    MachineNotFound,
    MachineRunning,
    NameInUse,
)
from ember.machines.state import MachineState, VMConfig
from ember.machines.store import MachineStore
from tests.machines.records import network_json, stoppable_monitor


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
    with pytest.raises(MachineError, match="damaged record"):
        mstate.read_state(d)
    (d / "state.json").write_text('{"id": "x"}')
    with pytest.raises(MachineError):
        mstate.read_state(d)


def test_dir_refuses_hostile_ids(tmp_path: Path) -> None:
    store = MachineStore(Home(tmp_path))
    for bad in ("../etc", "a" * 63, "A" * 64, ""):
        with pytest.raises(MachineNotFound):
            store.dir(bad)


def _script_in_netns(script: str, home_dir: Path, machine_id: str, *more: str) -> Any:
    """Run ``script`` (argv: the state directory, the machine id, ``more``) in a network
    namespace of its own, for the TAPs and rules it makes; what it printed, as JSON."""
    import subprocess
    import sys

    from tests.machines.vmkit import delete_netns, new_netns

    netns = new_netns()
    try:
        res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script,
                              str(home_dir), machine_id, *more], capture_output=True, text=True)  # fmt: skip
    finally:
        delete_netns(netns)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


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
if sys.argv[3:] == ["taken"]:  # by another start meanwhile: its monitor in the record
    with mstate.update(MachineStore(home).dir(st.id)) as cur:
        cur.monitor_pid = 1
lifecycle.abandon_start(home, st, "no monitor")
print(json.dumps({"state": mstate.read_state(MachineStore(home).dir(st.id)).to_json(),
                  "networks": list(NetworkManager(home).machines())}))
"""


def test_a_start_no_monitor_took_is_recorded_and_its_network_freed(tmp_path: Path) -> None:
    """What `ember start` does when its monitor does not take the machine."""
    st = make_state()
    MachineStore(Home(tmp_path)).create(st, "again")
    out = _script_in_netns(ABANDON, tmp_path, st.id)
    got = out["state"]
    assert (got["status"], got["exit_code"], got["error"]) == ("exited", 125, "no monitor")
    assert got["end_reason"] and got["finished_at"]
    assert out["networks"] == []


def test_a_start_no_monitor_took_leaves_a_start_made_since_alone(tmp_path: Path) -> None:
    """The record found without its monitor (by `refresh`) and taken by another `ember
    start` before the first one undid its start: the undo freed the other start's network
    and recorded its machine as not started."""
    st = make_state()
    MachineStore(Home(tmp_path)).create(st, "again")
    out = _script_in_netns(ABANDON, tmp_path, st.id, "taken")
    assert (out["state"]["status"], out["state"]["exit_code"]) == ("created", None)
    assert out["networks"] == [st.id]


def _damages(st: MachineState) -> dict[str, bytes]:
    good = st.to_json()
    return {
        "truncated": json.dumps(good).encode()[:40],
        "not an object": b"[]",
        "name null": json.dumps({**good, "name": None}).encode(),
        "no vm": json.dumps({k: v for k, v in good.items() if k != "vm"}).encode(),
        "vm of the wrong shape": json.dumps({**good, "vm": {**good["vm"], "cpus": "1"}}).encode(),
        "command not strings": json.dumps({**good, "command": [1]}).encode(),
        # every path of a machine is found by its id: a record copied into another
        # machine's directory had `rm` free that machine's disk and network
        "another machine's": json.dumps({**good, "id": "ab" + "0" * 62}).encode(),
        "an id that is none": json.dumps({**good, "id": "abc"}).encode(),
        # os.kill raised OverflowError in every command that looked at the machine
        "a pid out of range": json.dumps({**good, "status": "running", "monitor_pid": 1 << 40}).encode(),
        "a vmm pid of 0": json.dumps({**good, "vmm_pid": 0}).encode(),
        # `ps -a` subtracted it from an aware now(): a TypeError
        "a time without a zone": json.dumps({**good, "created_at": "2024-01-01T00:00:00"}).encode(),
        "a time that is none": json.dumps({**good, "finished_at": "yesterday"}).encode(),
        **{f"network {what}": json.dumps({**good, "network": net}).encode()
           for what, net in _network_damages().items()},
    }


def _network_damages() -> dict[str, Any]:
    """``ember start`` and the monitor read these: a KeyError or ValueError there was a
    traceback."""
    good = network_json([{"host_port": 8080, "guest_port": 80, "protocol": "tcp"}])
    port = good["ports"][0]
    return {
        "not an object": "eth0",
        "without its mac": {k: v for k, v in good.items() if k != "mac"},
        "with a prefix that is no number": {**good, "prefix": "24x"},
        "with a port that is no object": {**good, "ports": [80]},
        "with a port without its protocol": {**good, "ports": [{**port, "protocol": None}]},
        "with a port range of three": {**good, "ports": [{**port, "host_range": [1, 2, 3]}]},
        "with nameservers that are no list": {**good, "nameservers": "1.1.1.1"},
    }


def test_a_records_network_is_checked_as_it_is_read(tmp_path: Path) -> None:
    store = MachineStore(Home(tmp_path))
    st = make_state()
    st.network = network_json([{"host_port": 8080, "guest_port": 80, "protocol": "tcp",
                                "host_ip": "127.0.0.1", "host_range": [8000, 8100]}])  # fmt: skip
    store.create(st, "net")
    assert mstate.read_state(store.dir(st.id)).network == st.network
    for net in _network_damages().values():
        (store.dir(st.id) / "state.json").write_text(json.dumps({**st.to_json(), "network": net}))
        with pytest.raises(DamagedMachine, match="field 'network'"):
            mstate.read_state(store.dir(st.id))


@pytest.mark.parametrize("damage", list(_damages(make_state())))
def test_a_damaged_record_does_not_hide_the_other_machines(tmp_path: Path, damage: str) -> None:
    """One unreadable state.json made every machine command fail (ps, inspect of
    another machine, run, even rm of the damaged one)."""
    store = MachineStore(Home(tmp_path))
    good, bad = make_state("ab" + "0" * 62), make_state("cd" + "0" * 62)
    store.create(good, "good")
    store.create(bad, "bad")
    (store.dir(bad.id) / "state.json").write_bytes(_damages(bad)[damage])
    assert [m.id for m in store.list()] == [good.id]
    (damaged,) = store.scan()[1]
    assert damaged.machine_id == bad.id and f"ember rm -f {bad.id}" in str(damaged)
    assert store.find("good").id == good.id
    for ref in ("cd", bad.id):
        with pytest.raises(DamagedMachine):
            store.find(ref)
    store.create(make_state(), "third")  # names can still be reserved


@pytest.mark.root
@pytest.mark.integration
def test_ps_and_rm_of_a_damaged_machine(tmp_path: Path) -> None:
    """``ps -a`` lists the others and names the damaged one on stderr; ``rm`` says to
    force, ``rm -f`` removes it (network and root disk released, in a namespace of
    the test's own)."""
    import subprocess

    from tests.machines.vmkit import delete_netns, new_netns
    from tests.snapshots.conftest import make_home, teardown_home
    from tests.support.cli import ember_env, run_ember

    home = make_home(tmp_path / "home")
    store = MachineStore(home)
    good, bad = make_state("ab" + "0" * 62), make_state("cd" + "0" * 62)
    store.create(good, "good")
    store.create(bad, "bad")
    (store.dir(bad.id) / "state.json").write_text("[]")
    netns = new_netns()
    env = ember_env(home.root, EMBER_AGENT="0")

    def ember(*args: str) -> subprocess.CompletedProcess[str]:
        return run_ember(*args, prefix=["ip", "netns", "exec", netns], env=env, timeout=120)

    try:
        ps = ember("ps", "-a")
        assert ps.returncode == 0, ps.stderr
        assert "good" in ps.stdout and "cd00000000" not in ps.stdout
        assert f"machine {bad.id[:12]} has a damaged record" in ps.stderr
        assert ember("inspect", "good").returncode == 0
        refused = ember("rm", bad.id[:12])
        assert refused.returncode == 1 and f"ember rm -f {bad.id}" in refused.stderr
        assert "Traceback" not in refused.stderr
        removed = ember("rm", "-f", bad.id[:12])
        assert removed.returncode == 0, removed.stderr
        assert not store.dir(bad.id).exists()
        assert [m.id for m in store.list()] == [good.id] and store.scan()[1] == []
    finally:
        delete_netns(netns)
        teardown_home(home)


def test_rm_of_a_machine_another_run_is_creating(tmp_path: Path) -> None:
    """`ember run` holds ``state.creating`` from before the machine's first record until
    its disk and network are made, and names in that record the monitor it will hand the
    machine to: `rm` refuses the machine meanwhile (it freed disk and network while the
    run was making them); `rm -f` waits for the run, then stops the machine as one being
    started (marked stopped, its monitor waited for: it kills the VMM it was starting)
    and removes it.  A created machine nobody is making goes without -f, as docker rm's."""
    import subprocess
    import time

    from ember.process import proc_start_time
    from tests.machines.vmkit import delete_netns, new_netns
    from tests.snapshots.conftest import make_home, teardown_home
    from tests.support.cli import EMBER, ember_env, run_ember
    from tests.support.proc import wait_flock_blocked

    home = make_home(tmp_path / "home")
    store = MachineStore(home)
    monitor = subprocess.Popen(["sleep", "300"])  # plays the run's monitor
    making, made = make_state("ab" + "0" * 62), make_state("cd" + "0" * 62)
    making.monitor_pid, making.monitor_start = monitor.pid, proc_start_time(monitor.pid)
    hold = mstate.creating(store.dir(making.id))
    store.create(making, "making", holding=hold)
    store.create(made, "made")
    netns = new_netns()
    env = ember_env(home.root, EMBER_AGENT="0")
    prefix = ["ip", "netns", "exec", netns]
    forced: subprocess.Popen[str] | None = None
    try:
        refused = run_ember("rm", "making", prefix=prefix, env=env, timeout=120)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert "is being created by another ember command" in refused.stderr, refused.stderr
        assert store.dir(making.id).is_dir() and monitor.poll() is None
        forced = subprocess.Popen([*prefix, EMBER, "rm", "-f", "making"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        wait_flock_blocked(store.dir(making.id) / mstate.CREATING, forced.pid)
        assert store.dir(making.id).is_dir()
        hold.release()  # the run is done with it and hands it to its monitor
        deadline = time.monotonic() + 60
        while not store.find(making.id).stopped_by_user:
            assert time.monotonic() < deadline and forced.poll() is None, forced.communicate()
            time.sleep(0.05)
        assert store.dir(making.id).is_dir()  # waiting for the monitor to end
        monitor.kill()  # as the monitor does once it killed the VMM it was starting
        monitor.wait()
        out, err = forced.communicate(timeout=120)
        assert forced.returncode == 0, err
        assert not store.dir(making.id).exists()
        plain = run_ember("rm", "made", prefix=prefix, env=env, timeout=120)
        assert plain.returncode == 0, plain.stderr
        assert store.list() == []
        # a `creating` that cannot be opened (a symlink put there) is not a wait forever
        linked = make_state("ef" + "0" * 62)
        store.create(linked, "linked")
        (store.dir(linked.id) / mstate.CREATING).symlink_to(tmp_path / "elsewhere")
        assert run_ember("rm", "linked", prefix=prefix, env=env, timeout=120).returncode != 0
        gone = run_ember("rm", "-f", "linked", prefix=prefix, env=env, timeout=120)
        assert gone.returncode == 0, gone.stderr
        assert store.list() == [] and not (tmp_path / "elsewhere").exists()
    finally:
        hold.release()
        for proc in (forced, monitor):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        delete_netns(netns)
        teardown_home(home)


def test_start_waits_for_the_monitor_of_the_last_run_to_end(tmp_path: Path) -> None:
    """The record says exited before the monitor frees the network and host ports:
    `ember restart` (stop, then start) went on meanwhile, found the old ports taken, and
    the old monitor's teardown could remove the new run's TAP."""
    import subprocess
    import threading
    import time

    from ember.machines import lifecycle
    from ember.process import proc_start_time

    home = Home(tmp_path)
    st = make_state()
    # an ending monitor: this child stands in for it (not restarting: policy "no")
    monitor = subprocess.Popen(["sleep", "60"])
    try:
        st.status, st.exit_code, st.finished_at = mstate.EXITED, 0, mstate.now()
        st.monitor_pid, st.monitor_start = monitor.pid, proc_start_time(monitor.pid)
        MachineStore(home).create(st, "ending")
        ended = threading.Event()

        def end_it() -> None:
            time.sleep(0.5)
            ended.set()
            monitor.kill()

        threading.Thread(target=end_it, daemon=True).start()
        # (a record from an older ember: refused, but only once the monitor is gone)
        with pytest.raises(MachineError, match="older ember"):
            lifecycle.prepare_start(home, st)
        assert ended.is_set()
    finally:
        monitor.kill()
        monitor.wait()


def test_a_start_killed_before_its_monitor_took_the_machine_leaves_it_startable(
    tmp_path: Path,
) -> None:
    """`ember start` killed between preparing the record (created) and handing it to its
    monitor (which then exits): no command could start, stop or kill the machine again,
    only `rm -f` it, root disk and all.  The record names that monitor now, and the next
    command finds it gone and records the end."""
    import subprocess

    from ember.machines import lifecycle
    from ember.process import proc_start_time

    home = Home(tmp_path)
    st = make_state()
    monitor = subprocess.Popen(["sleep", "60"])  # stands in for the monitor it started
    st.status = mstate.CREATED
    st.monitor_pid, st.monitor_start = monitor.pid, proc_start_time(monitor.pid)
    MachineStore(home).create(st, "killedstart")
    monitor.kill()  # the CLI died: its monitor read EOF and exited
    monitor.wait()
    # (a record from an older ember: refused for that, not as "being created")
    with pytest.raises(MachineError, match="older ember"):
        lifecycle.prepare_start(home, st)
    after = mstate.read_state(MachineStore(home).dir(st.id))
    assert (after.status, after.exit_code) == (mstate.EXITED, 255)
    assert after.end_reason == "the machine's monitor disappeared"


def test_a_record_whose_monitor_is_gone_says_exited_only_once_its_network_is_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded exited first, a repair killed before the teardown left an exited record
    whose TAP, rules and host ports no later command freed (refresh looks at running
    records only).  Network first: killed in between, the next refresh does it again."""
    import subprocess

    from ember.machines import lifecycle
    from ember.net.manager import NetworkManager
    from ember.process import proc_start_time

    home = Home(tmp_path)
    st = make_state()
    monitor = subprocess.Popen(["sleep", "60"])
    st.status, st.started_at = mstate.RUNNING, mstate.now()
    st.monitor_pid, st.monitor_start = monitor.pid, proc_start_time(monitor.pid)
    MachineStore(home).create(st, "lost")
    monitor.kill()
    monitor.wait()
    seen: list[str] = []

    def teardown(self: NetworkManager, machine_id: str) -> None:
        seen.append(mstate.read_state(MachineStore(home).dir(machine_id)).status)

    monkeypatch.setattr(NetworkManager, "teardown", teardown)
    after = lifecycle.refresh(home, st)
    assert seen == [mstate.RUNNING]  # freed while the record still said running
    assert (after.status, after.exit_code) == (mstate.EXITED, 255)


LOST_HOLDER = """
import json, subprocess, sys
from pathlib import Path
from ember.home import Home
from ember.machines import lifecycle, state as mstate
from ember.machines.store import MachineStore
from ember.net.manager import NetworkManager
from ember.net.ports import parse_publish
from ember.process import proc_start_time
home = Home(Path(sys.argv[1]))
old = MachineStore(home).find(sys.argv[2])
NetworkManager(home).setup(old.id, ports=parse_publish("8080:80"))
gone = subprocess.Popen(["sleep", "60"])
with mstate.update(MachineStore(home).dir(old.id)) as cur:  # running, its monitor ...
    cur.status, cur.monitor_pid, cur.monitor_start = "running", gone.pid, proc_start_time(gone.pid)
gone.kill(); gone.wait()  # ... gone (a host reboot, a kill -9)
net = lifecycle._setup_network(home, "b" * 64, ports=parse_publish("8080:80"), network="default")
print(json.dumps({"port": net.ports[0].host_port,
                  "old": mstate.read_state(MachineStore(home).dir(old.id)).status,
                  "networks": sorted(NetworkManager(home).machines())}))
NetworkManager(home).teardown("b" * 64)
"""


def test_a_port_held_by_a_machine_whose_monitor_is_gone_is_freed_for_a_new_one(
    tmp_path: Path,
) -> None:
    """After a reboot (or a monitor's kill -9) its machine's network allocation stayed
    until a command looked at that machine: `ember run -p` of its port said "already
    published by machine ..." for a machine that was not running."""
    st = make_state()
    MachineStore(Home(tmp_path)).create(st, "old")
    out = _script_in_netns(LOST_HOLDER, tmp_path, st.id)
    assert out == {"port": 8080, "old": "exited", "networks": ["b" * 64]}


ORPHAN_HOLDER = """
import json, sys
from pathlib import Path
from ember.home import Home
from ember.machines import lifecycle
from ember.net.manager import NetworkManager
from ember.net.ports import parse_publish
home = Home(Path(sys.argv[1]))
NetworkManager(home).setup(sys.argv[2], ports=parse_publish("8080:80"))  # no machine has it
net = lifecycle._setup_network(home, "b" * 64, ports=parse_publish("8080:80"), network="default")
print(json.dumps({"port": net.ports[0].host_port, "networks": sorted(NetworkManager(home).machines())}))
NetworkManager(home).teardown("b" * 64)
"""


def test_a_port_held_for_a_machine_that_no_longer_exists_is_freed(tmp_path: Path) -> None:
    """A removal that could not free a machine's network deletes the rest: its
    allocation (TAP, rules, host port) then stayed for ever, nothing names it."""
    out = _script_in_netns(ORPHAN_HOLDER, tmp_path, "c" * 64)
    assert out == {"port": 8080, "networks": ["b" * 64]}


ORPHAN_GC = """
import json, sys
from pathlib import Path
from ember.home import Home
from ember.net.manager import NetworkManager
from ember.net.ports import parse_publish
from ember.snapshots.gc import collect
home = Home(Path(sys.argv[1]))
NetworkManager(home).setup(sys.argv[2], ports=parse_publish("8080:80"))  # no machine has it
dry = collect(home, dry_run=True)
left_by_dry_run = sorted(NetworkManager(home).machines())
report = collect(home)
print(json.dumps({"dry": dry.networks, "after_dry": left_by_dry_run,
                  "freed": report.networks, "left": sorted(NetworkManager(home).machines())}))
"""


def test_ember_gc_frees_the_network_of_a_machine_that_no_longer_exists(tmp_path: Path) -> None:
    """Freed only when a set-up found its port taken, an orphaned allocation kept its
    DNAT rule: a host program listening on that port lost its traffic to an address
    nothing held."""
    out = _script_in_netns(ORPHAN_GC, tmp_path, "c" * 64)
    assert out == {"dry": ["c" * 12], "after_dry": ["c" * 64], "freed": ["c" * 12], "left": []}


AFTER_REBOOT = LOST_HOLDER.split("net = lifecycle")[0] + """
# the host rebooted since: the TAP is gone (here: deleted), the allocation not
import json as j
from ember.net import tap
tap.delete_link(NetworkManager(home).machines()[old.id].tap)
path = home.root / "net" / "state.json"
saved = j.loads(path.read_text())
for entry in saved["machines"].values():
    entry["boot_id"] = "an-earlier-boot"
path.write_text(j.dumps(saved))
net = lifecycle._setup_network(home, "b" * 64, ports=parse_publish("9090:80"), network="default")
rules = subprocess.run(["nft", "list", "table", "inet", "ember"], capture_output=True, text=True)
print(json.dumps({"old": mstate.read_state(MachineStore(home).dir(old.id)).status,
                  "networks": sorted(NetworkManager(home).machines()),
                  "old_rule": "tcp . 8080" in rules.stdout}))
NetworkManager(home).teardown("b" * 64)
"""


def test_after_a_reboot_the_first_setup_does_not_put_dead_machines_rules_back(
    tmp_path: Path,
) -> None:
    """Review finding: after a reboot the first machine's set-up wrote the ruleset with
    every recorded machine's DNAT rules: a host program that took 8080 since the boot
    lost its traffic to a machine that no longer ran."""
    st = make_state()
    MachineStore(Home(tmp_path)).create(st, "old")
    out = _script_in_netns(AFTER_REBOOT, tmp_path, st.id)
    assert out == {"old": "exited", "networks": ["b" * 64], "old_rule": False}


# ---- leftovers of commands killed half-way (MachineStore.sweep, run by ember gc) ----


def _later() -> float:
    """A ``now`` past the sweep's age threshold: a directory's age is its ctime, which
    no test can set back."""
    import time

    from ember.machines.store import LEFTOVER_AGE

    return time.time() + LEFTOVER_AGE + 60


def test_sweep_removes_what_an_rm_killed_while_deleting_left(tmp_path: Path) -> None:
    """``ember rm`` renames the directory to ``.removing-<id>`` and then deletes it: killed
    in between, the tombstone (logs, initrd) stayed for ever."""
    store = MachineStore(Home(tmp_path))
    tomb = store.root / f".removing-{'a' * 64}"
    (tomb / "sub").mkdir(parents=True)
    (tomb / "console.log").write_bytes(b"x" * 1000)
    (tomb / "sub" / "f").write_bytes(b"y" * 24)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    (tomb / "link").symlink_to(outside)
    planted = store.root / f".removing-{'b' * 64}"
    planted.symlink_to(outside)  # a symlink so named: not followed, not removed
    assert store.sweep().dirs == 0  # too recent: an rm may be deleting it right now
    assert tomb.is_dir()
    dry = store.sweep(remove=False, now=_later())
    assert (dry.dirs, dry.bytes) == (1, 1024) and tomb.is_dir()
    swept = store.sweep(now=_later())
    assert (swept.dirs, swept.bytes) == (1, 1024)
    assert not tomb.exists() and planted.is_symlink()
    assert (outside / "keep").read_text() == "mine"


def test_sweep_removes_a_directory_a_run_killed_before_its_first_record_left(
    tmp_path: Path,
) -> None:
    """``ember run`` killed between ``mkdir`` and the first ``write_state`` left a directory
    no command lists, finds or removes."""
    from ember.locks import FileLock

    store = MachineStore(Home(tmp_path))
    kept = make_state()
    store.create(kept, "kept")
    half = store.root / secrets.token_hex(32)
    half.mkdir(mode=0o700)
    (half / f".state.json.{'x' * 8}.tmp").write_bytes(b'{"id"')
    assert store.list() == [kept] and store.scan()[1] == []  # invisible to ps
    assert store.sweep().dirs == 0 and half.is_dir()  # too recent: a create under way
    dry = store.sweep(remove=False, now=_later())
    assert (dry.dirs, dry.bytes) == (1, 5) and half.is_dir()
    assert not (half / "lock").exists()  # a dry run changes nothing
    # a command holding the names lock may be creating it; one holding the machine's
    # lock is at it
    for held in (store.home.machine_names_lock, half / "lock"):
        with FileLock(held):
            assert store.sweep(now=_later()).dirs == 0 and half.is_dir()
    assert store.sweep(now=_later()).dirs == 1
    assert not half.exists()
    assert not [p for p in store.root.iterdir() if p.name.startswith(".removing-")]
    assert store.list() == [kept]  # a machine with its record is never one of them


def test_sweep_never_takes_a_symlink_for_a_machine_without_record(tmp_path: Path) -> None:
    store = MachineStore(Home(tmp_path))
    store.root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    link = store.root / secrets.token_hex(32)
    link.symlink_to(outside)
    assert store.sweep(now=_later()).dirs == 0
    assert link.is_symlink() and (outside / "keep").read_text() == "mine"


def test_sweep_removes_temp_files_killed_writers_left_in_machine_directories(
    tmp_path: Path,
) -> None:
    import os
    import time

    store = MachineStore(Home(tmp_path))
    st = make_state()
    d = store.create(st, "t")
    old = d / f".state.json.{'a' * 8}.tmp"
    old.write_bytes(b"half")
    young = d / f".run.config.{'b' * 8}.tmp"
    young.write_bytes(b"writing")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert store.sweep(remove=False).temp_files == 1 and old.exists()
    swept = store.sweep()
    assert (swept.temp_files, swept.bytes, swept.dirs) == (1, 4, 0)
    assert not old.exists() and young.exists()  # a writer's of a moment ago stays
    assert store.find("t").id == st.id


def test_start_refuses_a_machine_whose_kernel_is_gone(tmp_path: Path) -> None:
    """A kernel given with --kernel and moved since: `ember start` says so before it sets
    up a network, rather than hand its monitor a VMM that cannot be made."""
    from ember.machines import lifecycle

    home = Home(tmp_path)
    st = make_state()
    base = tmp_path / "base.initrd"
    base.write_bytes(b"")
    st.vm.base_initrd, st.vm.kernel = str(base), str(tmp_path / "moved-away")
    st.status = mstate.EXITED
    store = MachineStore(home)
    store.create(st, None)
    (store.dir(st.id) / lifecycle.RUN_CONFIG).write_bytes(b"")
    with pytest.raises(MachineError, match="kernel files are gone .*moved-away"):
        lifecycle.prepare_start(home, st)


def test_rm_does_not_free_a_machine_a_start_took_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rm` decided from a record read before it locked the machine: an `ember start`
    that set the machine up in between (its network, a new monitor) had that freed
    under it.  Under the lock the record is read again; changed, the machine stays."""
    import subprocess

    from ember.machines import lifecycle
    from ember.process import proc_start_time

    home = Home(tmp_path)
    st = make_state()
    st.status, st.finished_at = mstate.EXITED, mstate.now()
    store = MachineStore(home)
    store.create(st, "raced")
    d = store.dir(st.id)
    monitor = subprocess.Popen(["sleep", "60"])
    try:
        looked_at = mstate.read_state(d)

        def a_start_meanwhile(_home: Home, _st: MachineState) -> MachineState:
            with mstate.update(d) as cur:  # what prepare_start leaves for its monitor
                cur.status, cur.monitor_pid = mstate.CREATED, monitor.pid
                cur.monitor_start = proc_start_time(monitor.pid)
            return looked_at  # what rm saw before it

        monkeypatch.setattr(lifecycle, "_stop_pending_restart", a_start_meanwhile)
        with pytest.raises(MachineRunning, match="started by another ember command meanwhile"):
            lifecycle.remove(home, looked_at)
        assert mstate.read_state(d).status == mstate.CREATED  # record, disk, network kept
    finally:
        monitor.kill()
        monitor.wait()


def test_templates_are_built_only_for_kernels_ember_installed(tmp_path: Path) -> None:
    """The template builder's QEMU runs unconfined: a --kernel (with --kernel-modules) or
    config.json kernel ran there, with the modules ember-init loads."""
    from ember.machines.lifecycle import _installed_by_ember
    from ember.vm.kernel import KernelInfo

    home = Home(tmp_path / "home")
    installed = home.kernels / "6.1.0-1-amd64"
    mods = installed / "lib" / "modules" / "6.1.0-1-amd64"
    mods.mkdir(parents=True)
    (installed / "vmlinux").write_bytes(b"")
    assert _installed_by_ember(home, KernelInfo(None, installed / "vmlinux", mods, "6.1.0-1-amd64"))
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    (elsewhere / "vmlinux").write_bytes(b"")
    assert not _installed_by_ember(home, KernelInfo(None, elsewhere / "vmlinux", mods, "x"))
    assert not _installed_by_ember(home, KernelInfo(None, installed / "vmlinux", elsewhere, "x"))
    converted = home.custom_kernels / "abc" / "vmlinux"  # a --kernel bzImage, extracted
    converted.parent.mkdir(parents=True)
    converted.write_bytes(b"")
    assert not _installed_by_ember(home, KernelInfo(elsewhere / "vmlinuz", converted, mods, "x"))


def test_a_vmm_is_known_by_its_start_time_not_its_command_line(tmp_path: Path) -> None:
    """A QEMU a guest escaped into can rewrite its argv: found by the machine id in its
    command line, it was taken for gone (its network torn down, the record exited) and
    `ember kill` / `rm -f` never killed it."""
    import subprocess

    from ember.machines.lifecycle import vmm_alive
    from ember.process import proc_start_time

    st = make_state()
    vmm = subprocess.Popen(["sleep", "60"])  # a command line without the machine's id
    try:
        st.vmm_pid, st.vmm_start = vmm.pid, proc_start_time(vmm.pid)
        assert vmm_alive(st)
        st.vmm_start = (st.vmm_start or 0) + 1  # another process that got the same pid
        assert not vmm_alive(st)
    finally:
        vmm.kill()
        vmm.wait()
    st.vmm_start = proc_start_time(os.getpid())
    assert not vmm_alive(st)  # gone



def _stored(tmp_path: Path, name: str, **fields: Any) -> tuple[Home, Path]:
    """A machine record made without a VM, with ``fields``; its home and directory."""
    home = Home(tmp_path)
    st = make_state()
    for field, value in fields.items():
        setattr(st, field, value)
    store = MachineStore(home)
    store.create(st, name)
    return home, store.dir(st.id)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_machine_restarted_as_it_is_stopped_is_stopped(tmp_path: Path, how: str) -> None:
    """A stop (or kill) that looked at the machine between two runs of its restart policy,
    then found it running again (its monitor had started the next run meanwhile), took
    it for not running: `ember stop` exited 0 without stopping or marking it, and the
    policy went on running it (CI saw a --restart always machine still restarting after
    a stop).  The look that decides and the mark are one step under the machine's lock."""
    from ember.machines import lifecycle

    home, d = _stored(tmp_path, "restarted", restart_policy="always", status=mstate.EXITED,
                      exit_code=0)  # fmt: skip
    with stoppable_monitor(d) as monitor:
        looked_at = mstate.read_state(d)  # exited, its monitor about to run it again
        with mstate.update(d) as cur:  # which it did: the next run
            cur.status, cur.exit_code, cur.restart_count = mstate.RUNNING, None, 1
        end = getattr(lifecycle, how)(home, looked_at)
        assert (end.status, end.stopped_by_user, end.restart_count) == (mstate.EXITED, True, 1)
        assert monitor.wait(timeout=10) == 0


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stopping_a_machine_its_monitor_removes_as_it_ends(tmp_path: Path, how: str) -> None:
    """A --rm machine being started, stopped: its monitor ends it and deletes it, and the
    stop that waited for that failed reading the record gone (a traceback-like "No such
    file or directory", exit 1)."""
    from ember.machines import lifecycle

    home, d = _stored(tmp_path, "once", status=mstate.CREATED, auto_remove=True)
    with stoppable_monitor(d, removes=True) as monitor:
        looked_at = mstate.read_state(d)
        end = getattr(lifecycle, how)(home, looked_at)
        assert end.id == looked_at.id and not d.exists()
        assert monitor.wait(timeout=10) == 0


def test_a_start_leaves_a_machine_between_two_restarts_to_its_monitor(tmp_path: Path) -> None:
    """`ember start` of a machine whose monitor waits out the backoff to run it again set
    it up for a second monitor: the first then ran it again as well (an on-failure job
    that had succeeded under the second ran again), the record naming the other one.  As
    docker's start of a restarting container, it leaves it be; and a monitor finding the
    machine taken by another start does not restart it."""
    from ember.machines import lifecycle
    from ember.machines.errors import MachineRestarting

    home, d = _stored(tmp_path, "looping", restart_policy="on-failure", status=mstate.EXITED,
                      exit_code=1)  # fmt: skip
    with stoppable_monitor(d) as monitor:
        with pytest.raises(MachineRestarting, match="is restarting"):
            lifecycle.prepare_start(home, mstate.read_state(d))
        assert mstate.read_state(d).monitor_pid == monitor.pid
        # (this process is not the monitor the record names)
        with pytest.raises(MachineError, match="started by another ember command"):
            lifecycle.prepare_start(home, mstate.read_state(d), restart=True)


@pytest.mark.parametrize("removes", [False, True])
def test_rm_f_of_a_machine_being_started(tmp_path: Path, removes: bool) -> None:
    """Marked stopped, its monitor waited for (which ends it as it starts); its exit code
    kept for an `ember wait` on it (it was only for a running one rm -f killed), and one
    its --rm monitor deleted meanwhile is no error."""
    from ember.machines import lifecycle

    home, d = _stored(tmp_path, "starting", status=mstate.CREATED, auto_remove=removes)
    with stoppable_monitor(d, removes=removes):
        st = mstate.read_state(d)
        lifecycle.remove(home, st, force=True)
    assert not d.exists()
    assert mstate.removed_exit_code(home.run, st.id) == (None if removes else 143)


def test_a_create_undone_in_part_keeps_its_record_for_rm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed `ember run` whose network could not be freed either (the disk full for
    the state file too) deleted the machine all the same: the network entry then held
    its address and host ports for good, with no machine `rm` could find.  The record
    stays, and `rm -f` frees the rest."""
    from ember.machines import lifecycle
    from ember.net.errors import NetworkError
    from ember.net.manager import NetworkManager

    home, d = _stored(tmp_path, "failed", status=mstate.CREATED)
    machine_id = d.name

    def full_disk(self: NetworkManager, machine_id: str) -> None:
        raise NetworkError("cannot write the network state: No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(NetworkManager, "teardown", full_disk)
        lifecycle._undo_create(home, machine_id, None, None)
    assert d.is_dir()
    assert f"ember rm -f {machine_id[:12]} frees the rest" in caplog.text
    assert "No space left on device" in caplog.text
    lifecycle.remove(home, mstate.read_state(d), force=True)
    assert not d.exists()


def _dead_monitor(st: MachineState) -> None:
    """Name a monitor in ``st`` that has exited (killed, or died)."""
    import subprocess

    from ember.process import proc_start_time

    gone = subprocess.Popen(["sleep", "60"])
    st.monitor_pid, st.monitor_start = gone.pid, proc_start_time(gone.pid)
    gone.kill()
    gone.wait()


def test_an_rm_machine_repaired_twice_is_removed_once_without_an_error(tmp_path: Path) -> None:
    """Two commands repairing a --rm machine whose monitor died: the second one's lock
    was in the directory the first removed (FileNotFoundError: "No such file or
    directory: .../lock", exit 1; in `stop a b` the other machines went unreported)."""
    from ember.machines import lifecycle

    home = Home(tmp_path)
    st = make_state()
    st.status, st.started_at, st.auto_remove = mstate.RUNNING, mstate.now(), True
    _dead_monitor(st)
    MachineStore(home).create(st, "gone-rm")
    first = lifecycle.refresh(home, st)
    assert (first.status, first.exit_code) == (mstate.EXITED, 255)
    assert not MachineStore(home).dir(st.id).exists()
    assert lifecycle.refresh(home, st) is st  # as it was seen: the caller finds it gone
    with pytest.raises(MachineNotFound):
        lifecycle.mark_stopped_by_user(home, st)
    assert lifecycle.kill_vmm(home, st) is st  # ended meanwhile: nothing left to kill


def test_an_ended_rm_machine_whose_monitor_died_before_removing_it_is_removed(
    tmp_path: Path,
) -> None:
    """The monitor records the end, then removes a --rm machine: killed in between (or
    its removal failed), the record stayed in `ps -a` for ever (refresh repaired
    running records only)."""
    from ember.machines import lifecycle

    home = Home(tmp_path)
    st = make_state()
    st.status, st.exit_code, st.auto_remove = mstate.EXITED, 3, True
    st.started_at = st.finished_at = mstate.now()
    _dead_monitor(st)
    MachineStore(home).create(st, "ended-rm")
    kept = make_state()  # the same, without --rm: an exited record stays
    kept.status, kept.exit_code = mstate.EXITED, 3
    _dead_monitor(kept)
    MachineStore(home).create(kept, "ended")
    assert lifecycle.refresh(home, kept).status == mstate.EXITED
    assert lifecycle.refresh(home, st).exit_code == 3
    assert [m.name for m in MachineStore(home).list()] == ["ended"]
    # its code is kept for an `ember wait` that was waiting for it
    assert mstate.removed_exit_code(home.run, st.id) == 3
    # and `ember ps -a` is what finds it
    again = make_state()
    again.status, again.exit_code, again.auto_remove = mstate.EXITED, 4, True
    _dead_monitor(again)
    MachineStore(home).create(again, "ended-rm-2")
    from tests.support.cli import ember_env, run_ember

    listed = run_ember("ps", "-a", "--json", env=ember_env(tmp_path))
    assert [m["name"] for m in json.loads(listed.stdout)] == ["ended"], listed.stderr
    assert [m.name for m in MachineStore(home).list()] == ["ended"]


KILLED_START = """
import json, os, signal, subprocess, sys
from pathlib import Path
from ember.home import Home
from ember.machines import lifecycle, state as mstate
from ember.machines.store import MachineStore
from ember.net.manager import NetworkManager
import ember.snapshots.chain as chain
home = Home(Path(sys.argv[1]))
d = MachineStore(home).dir(sys.argv[2])
chain.root_disk = lambda home, machine_id: Path("/nowhere/disk.ext4")  # (no pool here)
real = lifecycle._setup_network

def set_up_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the start

lifecycle._setup_network = set_up_then_die
monitor = subprocess.Popen(["sleep", "60"])  # the monitor `ember start` started
pid = os.fork()
if pid == 0:
    lifecycle.prepare_start(home, mstate.read_state(d), monitor_pid=monitor.pid)
    os._exit(0)
_, status = os.waitpid(pid, 0)
taken = sorted(NetworkManager(home).machines())
monitor.kill(); monitor.wait()  # it read EOF and exited
after = lifecycle.refresh(home, mstate.read_state(d))
print(json.dumps({"killed": os.WIFSIGNALED(status), "taken": taken, "status": after.status,
                  "left": sorted(NetworkManager(home).machines())}))
"""


def test_a_start_killed_while_it_sets_up_the_network_leaves_nothing_held(tmp_path: Path) -> None:
    """The network was set up while the record still said exited: an `ember start` (or
    a monitor restarting its machine) killed before the record changed left the TAP,
    rules and host ports held by an exited machine, which no command freed until it was
    started or removed.  The record says created, naming the monitor, first."""
    from ember.machines import lifecycle
    from ember.vm.runconfig import RunConfig

    base, kernel = tmp_path / "base.initrd", tmp_path / "vmlinuz"
    base.write_bytes(b"")
    kernel.write_bytes(b"")
    home, d = _stored(tmp_path, "halfstarted", status=mstate.EXITED, exit_code=0,
                      network=network_json([{"host_ip": None, "host_port": 8080,
                                             "guest_port": 80, "protocol": "tcp"}]))  # fmt: skip
    with mstate.update(d) as cur:
        cur.vm.base_initrd, cur.vm.kernel = str(base), str(kernel)
    (d / lifecycle.RUN_CONFIG).write_bytes(RunConfig(argv=("true",)).render())
    out = _script_in_netns(KILLED_START, tmp_path, d.name)
    assert out["killed"] and out["taken"] == [d.name]  # killed with the network set up
    assert out["status"] == mstate.EXITED
    assert out["left"] == []
