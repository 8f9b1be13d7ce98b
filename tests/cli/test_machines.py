"""Pure parts of ``ember ps/port`` (the commands themselves run against real machines in
tests/integration/test_run_vm.py)."""

from __future__ import annotations

import click
import pytest

from ember.cli.machines import port_lines

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
