from __future__ import annotations

import ipaddress

import pytest

from ember.net import ipam
from ember.net.errors import NetworkError, SubnetExhausted


def test_blocks_of_30() -> None:
    net = ipam.parse_subnet("172.30.0.0/16", 30)
    assert ipam.slot_count(net, 30) == 16384
    b = ipam.block(net, 30, 0)
    assert (str(b.network), str(b.gateway), str(b.guest), b.prefix) == (
        "172.30.0.0/30", "172.30.0.1", "172.30.0.2", 30,
    )  # fmt: skip
    last = ipam.block(net, 30, 16383)
    assert str(last.network) == "172.30.255.252/30" and str(last.guest) == "172.30.255.254"
    with pytest.raises(NetworkError):
        ipam.block(net, 30, 16384)


def test_blocks_of_31() -> None:
    net = ipam.parse_subnet("10.9.0.0/24", 31)
    b = ipam.block(net, 31, 3)
    assert (str(b.gateway), str(b.guest)) == ("10.9.0.6", "10.9.0.7")


def test_blocks_never_overlap() -> None:
    net = ipam.parse_subnet("10.0.0.0/26", 30)
    seen: set[ipaddress.IPv4Address] = set()
    for slot in range(ipam.slot_count(net, 30)):
        b = ipam.block(net, 30, slot)
        addrs = set(b.network)
        assert not addrs & seen and b.network.subnet_of(net)
        seen |= addrs


def test_first_free_and_exhaustion() -> None:
    net = ipam.parse_subnet("10.0.0.0/29", 30)
    assert ipam.first_free(net, 30, set()) == 0
    assert ipam.first_free(net, 30, {0}) == 1
    assert ipam.first_free(net, 30, {1}) == 0
    with pytest.raises(SubnetExhausted):
        ipam.first_free(net, 30, {0, 1})


@pytest.mark.parametrize(
    ("text", "prefix"),
    [("172.30.0.1/16", 30), ("fd00::/64", 30), ("nonsense", 30), ("10.0.0.0/31", 30),
     ("10.0.0.0/16", 29),
     # what the guard drops machines' traffic to: they could not reach their gateway
     ("169.254.0.0/16", 30), ("127.0.0.0/24", 30), ("224.0.0.0/24", 30), ("0.0.0.0/0", 30)],
)  # fmt: skip
def test_parse_subnet_rejects(text: str, prefix: int) -> None:
    with pytest.raises(NetworkError):
        ipam.parse_subnet(text, prefix)


def test_mac_is_local_unicast_and_unique() -> None:
    mac = ipam.mac_for(ipaddress.IPv4Address("172.30.1.2"))
    assert mac == "02:ee:ac:1e:01:02"
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b1


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wg0\t00051EAC\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
em-a1a1a1a1a1a1\t00001EAC\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0
"""


def test_routes_overlapping_the_machine_subnet_are_found() -> None:
    """A subnet the host also routes elsewhere (a LAN, a VPN: 172.30.5.0/24 on wg0 here)
    was handed out as it was: a machine there hid that network from the host."""
    def clashes(subnet: str) -> list[tuple[str, str]]:
        found = ipam.overlapping_routes(ipam.parse_subnet(subnet), ROUTES, own_prefix="em-")
        return [(iface, str(net)) for iface, net in found]

    assert clashes("172.30.0.0/16") == [("wg0", "172.30.5.0/24")]  # not the default, not a TAP's
    assert clashes("172.30.0.0/22") == []
    assert clashes("192.0.2.0/28") == [("eth0", "192.0.2.0/24")]
    assert clashes("10.0.0.0/8") == []
    assert ipam.overlapping_routes(ipam.parse_subnet("10.0.0.0/8"), "junk\nnot a route", own_prefix="em-") == []
