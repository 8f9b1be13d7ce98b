"""Address allocation for machines (pure arithmetic; persistence is in ``manager``).

The machine subnet (default 172.30.0.0/16) is cut into blocks of ``prefix``
(/30: network, host gateway, guest, broadcast; /31: gateway, guest).  Slot *i*
is the *i*-th block.  Each machine gets one block: the host end of its TAP holds
the gateway address, the guest the other one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ember.net.errors import NetworkError, SubnetExhausted

DEFAULT_SUBNET = "172.30.0.0/16"
DEFAULT_PREFIX = 30


@dataclass(frozen=True)
class Block:
    slot: int
    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    guest: ipaddress.IPv4Address

    @property
    def prefix(self) -> int:
        return self.network.prefixlen


def parse_subnet(text: str, prefix: int = DEFAULT_PREFIX) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise NetworkError(f"invalid machine subnet {text!r}: {e}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise NetworkError(f"machine subnet {text!r} must be IPv4")
    if prefix not in (30, 31):
        raise NetworkError(f"per-machine prefix must be 30 or 31, not {prefix}")
    if net.prefixlen > prefix:
        raise NetworkError(f"machine subnet {text} is smaller than one /{prefix}")
    for special in _NOT_FOR_MACHINES:
        if net.overlaps(special):
            # the guard drops what machines send there (host loopback, link-local)
            raise NetworkError(f"machine subnet {text} overlaps {special}, which machines may not use")
    return net


_NOT_FOR_MACHINES = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv4Network("169.254.0.0/16"),
    ipaddress.IPv4Network("224.0.0.0/3"),  # multicast and reserved
)


def slot_count(subnet: ipaddress.IPv4Network, prefix: int) -> int:
    return 1 << (prefix - subnet.prefixlen)


def block(subnet: ipaddress.IPv4Network, prefix: int, slot: int) -> Block:
    if not 0 <= slot < slot_count(subnet, prefix):
        raise NetworkError(f"slot {slot} is outside {subnet} (/{prefix} blocks)")
    size = 1 << (32 - prefix)
    base = int(subnet.network_address) + slot * size
    network = ipaddress.IPv4Network((base, prefix))
    if prefix == 31:
        gw, guest = base, base + 1
    else:
        gw, guest = base + 1, base + 2
    return Block(slot, network, ipaddress.IPv4Address(gw), ipaddress.IPv4Address(guest))


def first_free(subnet: ipaddress.IPv4Network, prefix: int, used: set[int]) -> int:
    """The lowest slot not in ``used``."""
    n = slot_count(subnet, prefix)
    for slot in range(n):
        if slot not in used:
            return slot
    raise SubnetExhausted(
        f"no free addresses left in {subnet} ({n} machines)",
        hint="remove stopped machines (ember rm) or configure a bigger subnet",
    )


def mac_for(address: ipaddress.IPv4Address) -> str:
    """A locally administered unicast MAC derived from the guest address (unique per host)."""
    b = address.packed
    return "02:ee:" + ":".join(f"{x:02x}" for x in b)


def overlapping_routes(
    subnet: ipaddress.IPv4Network, route_table: str, *, own_prefix: str
) -> list[tuple[str, ipaddress.IPv4Network]]:
    """The routes of a ``/proc/net/route`` text (interface, network) whose network
    overlaps ``subnet``, but for the default route and those of interfaces named
    ``own_prefix...`` (the machines' own TAPs).  A machine given an address the host
    also reaches elsewhere (a LAN, a VPN, a docker0 of that range) shadows that network
    for the host and cannot reach it itself."""
    found = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[0].startswith(own_prefix):
            continue
        try:
            destination, mask = (int.from_bytes(bytes.fromhex(f), "little") for f in (fields[1], fields[7]))
            network = ipaddress.IPv4Network((destination, bin(mask).count("1")), strict=False)
        except ValueError:
            continue  # not a line of the kernel's: nothing to say about it
        if network.prefixlen and network.overlaps(subnet):
            found.append((fields[0], network))
    return found
