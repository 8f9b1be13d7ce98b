from __future__ import annotations

import re

import pytest

from ember.net.errors import InvalidPortSpec
from ember.net.ports import (
    DEFAULT_EPHEMERAL,
    PortMapping,
    conflicts,
    ephemeral_range,
    exposed_mappings,
    parse_publish,
    pick_host_port,
    unpublished_exposed,
)


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("8080:80", PortMapping(8080, 80, "tcp", None)),
        ("8080:80/udp", PortMapping(8080, 80, "udp", None)),
        ("8080:80/TCP", PortMapping(8080, 80, "tcp", None)),
        ("8080:80/", PortMapping(8080, 80, "tcp", None)),
        ("127.0.0.1:8080:80", PortMapping(8080, 80, "tcp", "127.0.0.1")),
        ("0.0.0.0:53:53/udp", PortMapping(53, 53, "udp", None)),
        ("65535:1", PortMapping(65535, 1, "tcp", None)),
        ("0:80", PortMapping(0, 80, "tcp", None)),  # docker's: host port 0 is "pick one"
        ("127.0.0.1:0:80", PortMapping(0, 80, "tcp", "127.0.0.1")),
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
    ["", "80:", "80:65536", "a:80", "80:80/sctp", "1.2.3:80:80", "0", "/udp",
     "::1:80:80", "[::1]:80:80", "80:8000-8010", "8002-8000:9002-9000", "1-2:3-5", "1-2000",
     "1-1025:1-1025", "8000-:9000-", "-8000:-9000", "8000--8001:1-3", "1:2:3:4", "080000:80",
     " 80 :80", "+1:80", "\u0668\u0660:80", "80:\u0668\u0660",  # Arabic-Indic digits
     # a group or the broadcast address: the host's own mDNS/DHCP sends would be DNAT'd
     "224.0.0.251:5353:53/udp", "255.255.255.255:6767:67/udp", "240.0.0.1:80:80"],
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


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("80", (PortMapping(0, 80),)),
        ("53/udp", (PortMapping(0, 53, "udp"),)),
        (":80", (PortMapping(0, 80),)),
        ("127.0.0.1::80", (PortMapping(0, 80, "tcp", "127.0.0.1"),)),
        ("80-81", (PortMapping(0, 80), PortMapping(0, 81))),
        ("8000-8010:80", (PortMapping(0, 80, host_range=(8000, 8010)),)),
        ("10.0.0.1:8000-8001:80/udp", (PortMapping(0, 80, "udp", "10.0.0.1", (8000, 8001)),)),
    ],
)
def test_parse_host_ports_left_to_choose(spec: str, want: tuple[PortMapping, ...]) -> None:
    got = parse_publish(spec)
    assert got == want
    assert not any(m.chosen for m in got)
    assert tuple(PortMapping.from_json(m.to_json()) for m in got) == want


def test_pick_host_port_skips_published_and_bound_ports() -> None:
    published = [PortMapping(32768, 1), PortMapping(32770, 1, host_ip="127.0.0.1")]
    bound = {32769}
    wanted = PortMapping(0, 80)

    def bindable(m: PortMapping) -> bool:
        return m.host_port not in bound

    eph = range(32768, 32772)
    got = pick_host_port(wanted, published, eph, bindable)
    assert got == PortMapping(32771, 80, auto=True)  # 32770 overlaps: no address takes all
    # another address does not overlap 32770 on 127.0.0.1
    assert pick_host_port(PortMapping(0, 80, host_ip="10.0.0.1"), published, eph, bindable) == (
        PortMapping(32770, 80, host_ip="10.0.0.1", auto=True)
    )
    assert pick_host_port(wanted, published, eph, bindable, start=3) == got
    assert pick_host_port(wanted, [*published, PortMapping(32771, 9)], eph, bindable) is None
    # udp is another space
    assert pick_host_port(PortMapping(0, 80, "udp"), published, eph, bindable) == PortMapping(
        32768, 80, "udp", auto=True
    )
    ranged = PortMapping(0, 80, host_range=(9000, 9002))
    assert pick_host_port(ranged, [PortMapping(9000, 1)], eph, bindable) == PortMapping(
        9001, 80, host_range=(9000, 9002), auto=True
    )
    fixed = PortMapping(8080, 80)
    assert pick_host_port(fixed, [fixed], eph, bindable) is fixed  # the user's: kept


def test_a_port_ember_chose_before_is_kept_while_free() -> None:
    """``ember start``: the machine's earlier port again, or a new one if it was taken."""
    def bindable(m: PortMapping) -> bool:
        return True

    eph = range(32768, 32772)
    before = PortMapping(32770, 80, auto=True)
    assert PortMapping.from_json(before.to_json()) == before
    assert pick_host_port(before, [], eph, bindable) is before
    assert pick_host_port(before, [PortMapping(32770, 81)], eph, bindable) == PortMapping(
        32768, 80, auto=True
    )
    ranged = PortMapping(9001, 80, host_range=(9000, 9002), auto=True)
    assert pick_host_port(ranged, [PortMapping(9001, 1)], eph, bindable) == PortMapping(
        9000, 80, host_range=(9000, 9002), auto=True
    )


def test_ephemeral_range() -> None:
    assert ephemeral_range("32768\t60999\n") == range(32768, 61000)
    assert ephemeral_range("1024 1024") == range(1024, 1025)
    for bad in ("", "x y", "60999 32768", "0 10", "1 70000", "1 2 3"):
        assert ephemeral_range(bad) == DEFAULT_EPHEMERAL


@pytest.mark.parametrize(
    "damaged",
    [
        {"guest_port": 80},
        {"host_port": "8080", "guest_port": 80},
        {"host_port": 8080, "guest_port": None},
        {"host_port": 8080, "guest_port": 80, "host_range": ["1", 2]},
        {"host_port": 0, "guest_port": 80, "host_range": [1, 10**12]},
        {"host_port": 0, "guest_port": 80, "host_range": [0, 10]},
        {"host_port": 0, "guest_port": 80, "host_range": [9000, 8000]},
    ],
)
def test_a_damaged_stored_mapping_is_a_value_or_key_error(damaged: dict[str, object]) -> None:
    """What the records on disk hold is read back through from_json: a damaged one must be
    an error its readers catch (they turn it into "damaged record"), not a TypeError."""
    with pytest.raises((KeyError, ValueError)):
        PortMapping.from_json(damaged)


def test_publish_all_maps_every_exposed_port_the_p_options_leave() -> None:
    explicit = parse_publish("8080:80")
    got = exposed_mappings(["80/tcp", "53/udp", "9000-9002/tcp", "443", "132/sctp", "53/UDP"], explicit)
    assert got == (
        PortMapping(0, 53, "udp"),
        PortMapping(0, 9000), PortMapping(0, 9001), PortMapping(0, 9002),
        PortMapping(0, 443),
    )  # fmt: skip
    assert exposed_mappings([]) == ()
    assert unpublished_exposed(["80/tcp", "132/sctp", "9/SCTP", "53/udp"]) == ["132/sctp", "9/SCTP"]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("http", "invalid port 'http' in the image's ExposedPorts 'http'"),
        ("80/icmp", "unknown protocol 'icmp' in the image's ExposedPorts '80/icmp'"),
        ("0/tcp", "invalid port '0'"),
        ("90-80/tcp", "first > last"),
        ("1-65535/tcp", "longer than 1024"),
    ],
)
def test_publish_all_refuses_an_exposed_port_that_is_none(key: str, message: str) -> None:
    with pytest.raises(InvalidPortSpec, match=re.escape(message)):
        exposed_mappings([key])


def test_publish_all_is_bounded() -> None:
    with pytest.raises(InvalidPortSpec, match="exposes more than 1024 ports"):
        exposed_mappings(["1-1000/tcp", "2001-3000/tcp"])
    # keys that name the same ranges again publish nothing new, but each is walked
    with pytest.raises(InvalidPortSpec, match="names 1025 exposed ports: -P publishes at most 1024"):
        exposed_mappings([f"{i}-1000/tcp" for i in range(1, 1026)])


def test_an_exposed_key_is_quoted_short() -> None:
    with pytest.raises(InvalidPortSpec) as e:
        exposed_mappings(["9" * 5000])
    assert len(str(e.value)) < 200 and "the image's ExposedPorts" in str(e.value)


def test_a_machine_publishes_at_most_max_ports() -> None:
    """Each port is a DNAT rule every new connection of the host walks: twenty ranges of
    1024 made a connect to a closed local port ~90x slower, and no bound held them."""
    from ember.net.ports import MAX_PORTS, check_port_count

    ports = [m for r in ("1-1024:1-1024", "2000:80") for m in parse_publish(r)]
    check_port_count(ports[:MAX_PORTS])
    with pytest.raises(InvalidPortSpec, match=f"at most {MAX_PORTS}"):
        check_port_count(ports)
