"""Pure parts of ``ember ps/port`` (the commands themselves run against real machines in
tests/integration/test_run_vm.py)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import click
import pytest

from ember.cli.machines import port_lines
from ember.home import Home
from ember.machines import state as mstate
from ember.machines.state import MachineState, VMConfig
from ember.machines.store import MachineStore

PORTS = [
    {"host_ip": None, "host_port": 32771, "guest_port": 80, "protocol": "tcp"},
    {"host_ip": "127.0.0.1", "host_port": 8080, "guest_port": 80, "protocol": "tcp"},
    {"host_ip": None, "host_port": 5353, "guest_port": 53, "protocol": "udp"},
]


def test_port_lines_in_dockers_format() -> None:
    assert port_lines(PORTS, None) == [
        "80/tcp -> 127.0.0.1:8080",
        "80/tcp -> 0.0.0.0:32771",
        "53/udp -> 0.0.0.0:5353",
    ]
    assert port_lines(PORTS, "80") == ["127.0.0.1:8080", "0.0.0.0:32771"]
    assert port_lines(PORTS, "80/TCP") == ["127.0.0.1:8080", "0.0.0.0:32771"]
    assert port_lines(PORTS, "53/udp") == ["0.0.0.0:5353"]
    assert port_lines(PORTS, "53") == []  # tcp unless said
    assert port_lines(PORTS, "80/") == port_lines(PORTS, "80")
    assert port_lines([], None) == []


@pytest.mark.parametrize("query", ["", "x", "80/sctp", "-1", "/tcp", "0", "99999", "\u0668\u0660"])
def test_port_query_must_be_a_port(query: str) -> None:
    with pytest.raises(click.BadParameter):
        port_lines(PORTS, query)


def test_ps_keeps_one_machine_per_line_whatever_the_images_command(tmp_path: Path) -> None:
    """An image's Cmd is the tenant's: a newline in it made ``ps`` print a fake row, and
    control characters went to the terminal as they were."""
    st = MachineState(
        id=secrets.token_hex(32),
        name="",
        image="oci:/x:latest",
        image_digest="sha256:" + "0" * 64,
        created_at=mstate.now(),
        command=["sh", "-c", "a\nfake\x1b[2Jrow"],
        config={},
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1),
        status=mstate.EXITED,
        exit_code=0,
    )
    MachineStore(Home(tmp_path)).create(st, "hostile")
    res = subprocess.run(
        [str(Path(sys.executable).parent / "ember"), "ps", "-a"],
        capture_output=True, text=True, env={**os.environ, "EMBER_HOME": str(tmp_path)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and "hostile" in lines[1]
    assert '"sh -c a\\nfake\\x1b[2Jrow"' in lines[1]
