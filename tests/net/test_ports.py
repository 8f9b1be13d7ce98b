from __future__ import annotations

import pytest

from ember.net.errors import InvalidPortSpec
from ember.net.ports import PortMapping, conflicts, parse_publish


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("8080:80", PortMapping(8080, 80, "tcp", None)),
        ("8080:80/udp", PortMapping(8080, 80, "udp", None)),
        ("8080:80/TCP", PortMapping(8080, 80, "tcp", None)),
        ("127.0.0.1:8080:80", PortMapping(8080, 80, "tcp", "127.0.0.1")),
        ("0.0.0.0:53:53/udp", PortMapping(53, 53, "udp", None)),
        ("65535:1", PortMapping(65535, 1, "tcp", None)),
    ],
)
def test_parse(spec: str, want: PortMapping) -> None:
    assert parse_publish(spec) == (want,)
    assert PortMapping.from_json(want.to_json()) == want


def test_parse_ranges_pair_the_ports_in_order() -> None:
    assert parse_publish("127.0.0.1:8000-8002:9000-9002/udp") == (
        PortMapping(8000, 9000, "udp", "127.0.0.1"),
        PortMapping(8001, 9001, "udp", "127.0.0.1"),
        PortMapping(8002, 9002, "udp", "127.0.0.1"),
    )
    assert parse_publish("80-80:81-81") == (PortMapping(80, 81),)
    assert len(parse_publish("1-1024:1-1024")) == 1024


@pytest.mark.parametrize(
    "spec",
    ["80", "", ":80", "80:", "0:80", "80:65536", "a:80", "80:80/sctp", "1.2.3:80:80",
     "::1:80:80", "[::1]:80:80", "8000-8010:80", "80:8000-8010", "8002-8000:9002-9000", "1-2:3-5",
     "1-1025:1-1025", "8000-:9000-", "-8000:-9000", "8000--8001:1-3", "1:2:3:4", "080000:80",
     " 80 :80", "+1:80"],
)  # fmt: skip
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(InvalidPortSpec):
        parse_publish(spec)


def test_conflicts() -> None:
    a = PortMapping(8080, 80)
    assert conflicts(a, PortMapping(8080, 81))
    assert not conflicts(a, PortMapping(8080, 80, "udp"))
    assert not conflicts(a, PortMapping(8081, 80))
    assert conflicts(a, PortMapping(8080, 80, host_ip="127.0.0.1"))
    assert not conflicts(
        PortMapping(8080, 80, host_ip="127.0.0.1"), PortMapping(8080, 80, host_ip="10.0.0.1")
    )
