"""The run config a start boots with (``lifecycle.boot_run_config``): pure, no VM."""

from __future__ import annotations

import dataclasses
import secrets

import pytest

from ember.machines import state as mstate
from ember.machines.errors import DamagedMachine
from ember.machines.lifecycle import boot_run_config, extra_hosts_of
from ember.machines.state import MachineState, VMConfig
from ember.net.manager import MachineNetwork
from ember.vm.runconfig import HostEntry, Interface, RunConfig

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
