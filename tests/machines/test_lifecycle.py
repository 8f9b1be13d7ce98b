"""Pieces of the machine lifecycle that need no VM: the run config a start boots with
(``boot_run_config``, pure), the volumes a machine attaches (a real snapshot pool)."""

from __future__ import annotations

import dataclasses
import os
import secrets

import pytest

from ember.home import Home
from ember.machines import state as mstate
from ember.machines.errors import DamagedMachine
from ember.machines.lifecycle import (
    attaching_volumes,
    boot_run_config,
    extra_hosts_of,
    volume_users,
)
from ember.machines.state import MachineState, VMConfig
from ember.machines.store import MachineStore
from ember.net.manager import MachineNetwork
from ember.vm.runconfig import HostEntry, Interface, RunConfig
from ember.volumes.errors import VolumeInUse
from ember.volumes.store import Volumes

MACHINE_ID = "ab" * 32
NET = MachineNetwork(
    machine_id=MACHINE_ID, tap="embt0", mac="02:00:00:00:00:01", network="default",
    guest_ip="10.88.0.6", gateway="10.88.0.5", prefix=30, mtu=1420,
    nameservers=("192.0.2.53",),
)  # fmt: skip


def test_a_start_adds_its_network_own_host_line_and_the_hosts_nameservers() -> None:
    rc = boot_run_config(RunConfig(argv=("true",)), MACHINE_ID, "web", NET, ())
    assert rc.hosts == (HostEntry("10.88.0.6", (MACHINE_ID[:12], "web")),)
    assert rc.nameservers == ("192.0.2.53",)
    assert rc.network == (Interface("eth0", "10.88.0.6", 30, "10.88.0.5", 1420),)


def test_add_host_lines_follow_the_machines_own_and_host_gateway_is_this_starts_gateway() -> None:
    rc = RunConfig(argv=("true",), hostname="web-1", nameservers=("10.0.0.53",),
                   search=("example.com",))  # fmt: skip
    extra = ("db:10.1.2.3", "host.docker.internal:host-gateway", "v6:2001:db8::1")
    got = boot_run_config(rc, MACHINE_ID, "web", NET, extra)
    assert got.hosts == (
        HostEntry("10.88.0.6", ("web-1", "web")),
        HostEntry("10.1.2.3", ("db",)),
        HostEntry("10.88.0.5", ("host.docker.internal",)),
        HostEntry("2001:db8::1", ("v6",)),
    )
    # --dns replaces the host's nameservers; --dns-search stays as the run gave it
    assert got.nameservers == ("10.0.0.53",) and got.search == ("example.com",)
    # the next start may have another address: host-gateway follows it
    moved = dataclasses.replace(NET, guest_ip="10.88.0.10", gateway="10.88.0.9")
    again = boot_run_config(rc, MACHINE_ID, "web", moved, extra)
    assert again.hosts[2] == HostEntry("10.88.0.9", ("host.docker.internal",))
    assert RunConfig.parse(again.render()) == again  # what the guest reads


def _record(config: dict[str, object]) -> MachineState:
    return MachineState(
        id=secrets.token_hex(32), name="m1", image="oci:/x:latest",
        image_digest="sha256:" + "0" * 64, created_at=mstate.now(), command=["true"],
        config=config, vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1),
    )  # fmt: skip


def test_extra_hosts_of_a_record() -> None:
    assert extra_hosts_of(_record({})) == ()  # a record of an older ember
    entries = ["db:10.1.2.3", "gw:host-gateway"]
    assert extra_hosts_of(_record({"extra_hosts": entries})) == tuple(entries)


@pytest.mark.parametrize(
    "damaged", ["db:10.1.2.3", [1], ["db"], ["db:not-an-address"], ["a b:10.0.0.1"]]
)
def test_a_damaged_extra_hosts_field_is_a_damaged_record(damaged: object) -> None:
    with pytest.raises(DamagedMachine, match="extra_hosts"):
        extra_hosts_of(_record({"extra_hosts": damaged}))


def test_a_volume_inside_another_ones_target_is_mounted_after_it() -> None:
    from ember.machines.lifecycle import _volume_mounts
    from ember.vm.runconfig import Mount
    from ember.volumes.spec import parse_volumes

    got = _volume_mounts(parse_volumes(["inner:/data/sub", "outer:/data:ro", "other:/srv"]))
    assert got == (
        Mount("/dev/vdc", "/data", "ext4", "ro"),  # each keeps its disk (the order given)
        Mount("/dev/vdd", "/srv", "ext4", "rw"),
        Mount("/dev/vdb", "/data/sub", "ext4", "rw"),
    )


def _machine_with(home: Home, name: str, volumes: list[str], **kw: object) -> MachineState:
    st = _record({})
    st.name, st.vm.volumes = "", volumes
    for k, v in kw.items():
        setattr(st, k, v)
    MachineStore(home).create(st, name)
    return st


@pytest.mark.root
def test_a_volume_is_held_by_a_machine_its_restart_policy_runs_again(pool_home: Home) -> None:
    """A machine between two runs of `--restart always` is exited, and was not counted: a
    `run -v` took its volume, and its restart then gave up for good."""
    from ember.process import proc_start_time

    me = os.getpid()  # the "monitor" waiting out the backoff: alive
    _machine_with(pool_home, "policy", ["data:/data"], status=mstate.EXITED, exit_code=1,
                  finished_at=mstate.now(), restart_policy="always", monitor_pid=me,
                  monitor_start=proc_start_time(me))  # fmt: skip
    newcomer = _machine_with(pool_home, "new", ["data:/x"])
    said = "volume data is in use by machine policy, which is restarting"
    with pytest.raises(VolumeInUse, match=said), attaching_volumes(pool_home, newcomer, make=True):
        pass
    # its monitor gone: nothing will run it again, the volume is free
    with mstate.update(MachineStore(pool_home).dir(MachineStore(pool_home).find("policy").id)) as cur:
        cur.monitor_pid, cur.monitor_start = 1, 0.0
    with attaching_volumes(pool_home, newcomer, make=True) as disks:
        assert [d.name for d in disks] == ["disk.ext4"]


@pytest.mark.root
def test_removal_is_refused_while_a_record_cannot_be_read(pool_home: Home) -> None:
    Volumes(pool_home).create("data")
    st = _machine_with(pool_home, "user", ["not a spec"], status=mstate.EXITED)
    with pytest.raises(VolumeInUse, match=f"cannot tell whether machine {st.id[:12]} uses volume data"):
        volume_users(pool_home, "data")
    with mstate.update(MachineStore(pool_home).dir(st.id)) as cur:
        cur.vm.volumes = ["data:/data"]
    assert volume_users(pool_home, "data") == ["user"]
    # one whose record is unreadable may use it too
    (MachineStore(pool_home).dir(st.id) / "state.json").write_text("{")
    with pytest.raises(VolumeInUse, match="cannot tell whether machine"):
        volume_users(pool_home, "data")
