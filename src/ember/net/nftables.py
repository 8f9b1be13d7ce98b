"""The nftables ruleset for ember's machines (pure rendering).

Everything lives in one table, ``inet ember``, rebuilt as a whole from the
persisted allocations in one ``nft -f`` transaction each time a machine comes or
goes (no rule handles to track, nothing half-applied, and ``nft delete table
inet ember`` removes all of it).  The table holds:

- ``guard`` (filter, prerouting, before conntrack): a machine sends IPv4 from its
  own address only, never to 127.0.0.0/8 or 169.254.0.0/16, and no IPv6 (see
  ``render_ruleset``).
- ``forward`` (filter): replies pass; machines of the same network may talk
  (a named ifname set per network); a published port may be reached from any
  machine through a host address (``ct status dnat``, as with Docker); any
  other TAP-to-TAP traffic is dropped; with egress off, so is anything else a
  machine sends through the host.
  The policy stays ``accept`` so ember does not change the host's other traffic.
- ``prerouting``/``output`` (nat): DNAT for published ports, through two maps
  (``published``, ``published_at``): one lookup, however many ports.  ``output`` makes a
  published port reachable from the host itself; for 127.0.0.0/8 the TAP gets
  ``route_localnet`` and ``postrouting`` masquerades the loopback source (what
  Docker does without its userland proxy).  Chosen over a userspace proxy: no
  process per machine, no copy through Python, same path for UDP.
- ``postrouting`` (nat): masquerade of machine traffic leaving through a non-ember
  interface (egress NAT), when enabled; and of machine-to-published-port traffic
  (so that a machine reaching its own published port, hairpin, gets the reply
  back through the host).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ember.net.errors import NetworkError
from ember.net.ports import PROTOCOLS, PortMapping

_LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
TABLE_FAMILY = "inet"
TABLE_NAME = "ember"
TAP_PREFIX = "em-"
_NETWORK_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")
_TAP_RE = re.compile(r"^em-[0-9a-f]{1,12}$")
_ID_RE = re.compile(r"^[0-9a-f]{12,64}$")


@dataclass(frozen=True)
class MachineRules:
    """What the ruleset needs to know about one machine."""

    machine_id: str
    tap: str
    guest_ip: str
    network: str = "default"
    ports: Sequence[PortMapping] = field(default_factory=tuple)
    #: the DNS servers the machine was given: one on a link-local address (a cloud
    #: host's resolver, 169.254.169.254) stays reachable on port 53
    nameservers: Sequence[str] = field(default_factory=tuple)


#: Docker's special network modes, which an ember network name would silently not be
_DOCKER_MODES = {
    "none": "ember has no machine without a network yet: each gets one interface, "
    "reaching the outside and the machines of its own network",
    "host": "a machine has a kernel and a network stack of its own: it cannot share the host's",
}


def check_requested_network(name: str) -> str:
    """The network a new machine asks for (``--network``), as ember names it: a valid
    name, and not one of Docker's special modes (``none``, ``host``), which here would
    be an ordinary network, with full networking.  ``bridge``, Docker's name for its
    default network, is ember's ``default``."""
    if name == "bridge":
        return "default"
    if name in _DOCKER_MODES:
        raise NetworkError(f"--network {name}: {_DOCKER_MODES[name]}",
                           hint="give a network name of its own to keep a machine from others")  # fmt: skip
    return check_network_name(name)


def check_network_name(name: str) -> str:
    if not _NETWORK_RE.fullmatch(name):
        raise NetworkError(
            f"invalid network name {name!r} (lowercase letters, digits, _ and -; at most 31)"
        )
    return name


def _ipv4(text: object, what: str) -> str:
    """``text`` if it is an IPv4 address (or network) written as ipaddress writes it."""
    try:
        ok = isinstance(text, str) and str(ipaddress.IPv4Network(text)).removesuffix("/32") == text
    except ValueError:
        ok = False
    if not ok:
        raise NetworkError(f"invalid {what} {text!r:.60}")
    return str(text)


def check_machine_id(machine_id: object) -> str:
    """A machine id as ember makes them (hex), or NetworkError: it names TAP devices and
    goes into the ruleset."""
    if not isinstance(machine_id, str) or not _ID_RE.fullmatch(machine_id):
        raise NetworkError(f"invalid machine id {machine_id!r:.80}")
    return machine_id


def check_rules(m: MachineRules) -> None:
    """Every value the ruleset quotes, so that none can add a rule of its own."""
    if not _TAP_RE.fullmatch(m.tap):
        raise NetworkError(f"invalid TAP name {m.tap!r}")
    check_network_name(m.network)
    check_machine_id(m.machine_id)
    _ipv4(m.guest_ip, "guest address")
    for p in m.ports:
        if p.protocol not in PROTOCOLS or not all(
            type(n) is int and 1 <= n <= 65535 for n in (p.host_port, p.guest_port)
        ):
            raise NetworkError(f"invalid published port {p!s:.80} of machine {m.machine_id[:12]}")
        if p.host_ip is not None:
            _ipv4(p.host_ip, "host address")
    for n in m.nameservers:
        try:
            ipaddress.ip_address(n)  # (IPv6 ones too: a guest has no use for them yet)
        except ValueError:
            raise NetworkError(f"invalid nameserver address {n!r:.60}") from None


def _published_maps(machines: Iterable[MachineRules]) -> list[str]:
    """The published ports as two verdict-free NAT maps, one lookup per new connection
    whatever their number (a rule each made every new connection of the host walk all
    of them: 20,480 ports made a local connect ~90x slower): ``published`` for ports on
    every local address (protocol . port), ``published_at`` for ports on one host
    address (address . protocol . port); both give the guest's address . port."""
    anywhere: list[str] = []
    at_address: list[str] = []
    for m in machines:
        for p in m.ports:
            to = f"{m.guest_ip} . {p.guest_port}"
            if p.host_ip:
                at_address.append(f"{p.host_ip} . {p.protocol} . {p.host_port} : {to}")
            else:
                anywhere.append(f"{p.protocol} . {p.host_port} : {to}")
    to_guest = " : ipv4_addr . inet_service"
    return [
        *_collection("map", "published", "inet_proto . inet_service" + to_guest, anywhere),
        *_collection(
            "map", "published_at", "ipv4_addr . inet_proto . inet_service" + to_guest, at_address
        ),
    ]


def _collection(kind: str, name: str, type_: str, elements: list[str]) -> list[str]:
    """A named ``set`` or ``map`` of the table (no elements line when empty: nft refuses
    ``elements = { }``)."""
    lines = [f"\t{kind} {name} {{", f"\t\ttype {type_}"]
    if elements:
        lines.append(f"\t\telements = {{ {', '.join(elements)} }}")
    return [*lines, "\t}"]


#: the DNAT rules, the same in prerouting and output: the published maps do the work
_DNAT_RULES = (
    "meta nfproto ipv4 fib daddr type local dnat ip to meta l4proto . th dport map @published",
    # (a host address that is local: a directed broadcast one given as -p HOST_IP would
    # take the host's own broadcasts)
    "meta nfproto ipv4 fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @published_at",
)


#: what the table's comment says of the state directory whose machines' rules it holds
_OWNER_RE = re.compile(r"^ember home [0-9a-f]{16}$")
_COMMENT_RE = re.compile(r'^\s*comment "([^"\\]*)"\s*$')


def owner_of(home_root: str) -> str:
    """The table's comment for a state directory: ``ember home <16 hex>``, its real path
    hashed (a path is free text; a comment is at most 128 bytes, quoted)."""
    return "ember home " + hashlib.sha256(os.fsencode(home_root)).hexdigest()[:16]


def owner_in_listing(listing: str) -> str | None:
    """The owner comment in ``nft list table inet ember``'s output (None: none, as in
    an older ember's table)."""
    for line in listing.splitlines()[1:4]:  # it comes right after "table inet ember {"
        m = _COMMENT_RE.match(line)
        if m:
            return m.group(1)
    return None


def render_ruleset(
    machines: Sequence[MachineRules], *, subnet: str, egress: bool, owner: str | None = None
) -> str:
    """The whole ``nft -f`` script: replace table ``inet ember`` (or just delete it).
    ``owner``: ``owner_of`` the state directory it is made for, kept as the table's
    comment (``NetworkManager`` refuses a table another one owns)."""
    for m in machines:
        check_rules(m)
    if owner is not None and not _OWNER_RE.fullmatch(owner):
        raise NetworkError(f"invalid table owner {owner[:80]!r}")
    _ipv4(subnet, "machine subnet")
    out = [
        # create-then-delete makes the delete valid whether or not the table exists
        f"table {TABLE_FAMILY} {TABLE_NAME}",
        f"delete table {TABLE_FAMILY} {TABLE_NAME}",
    ]
    if not machines:
        return "\n".join(out) + "\n"
    by_tap = sorted(machines, key=lambda m: m.tap)
    networks: dict[str, list[str]] = {}
    for m in by_tap:
        networks.setdefault(m.network, []).append(m.tap)
    body: list[str] = []
    for name, taps in sorted(networks.items()):
        body += _collection("set", f"nw_{name}", "ifname", [f'"{t}"' for t in taps])
    body += _collection(
        "set", "sources", "ifname . ipv4_addr", [f'"{m.tap}" . {m.guest_ip}' for m in by_tap]
    )
    # Before conntrack and NAT (priority raw), on what a guest sends: its own address
    # only (a guest cannot pass for another machine), and never to 127.0.0.0/8, which
    # route_localnet (set on TAPs for published loopback ports) would otherwise route
    # to the host's loopback-only services (CVE-2020-8558's class).  Replies to a
    # published 127.0.0.1 port still carry the gateway address here: their
    # un-masquerading to 127.0.0.1 happens later, in conntrack.
    # Nor IPv6 at all (machines are IPv4 only: a router advertisement from a guest gave
    # the host a default route through it), nor link-local IPv4: 169.254.169.254 is a
    # cloud host's metadata service, with its credentials; but DNS to a link-local
    # resolver the machines were given (that address is a cloud host's resolver too).
    # (The sources as one set: a rule a machine made each guest packet walk them all.)
    body += [
        "\tchain guard {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        f'\t\tiifname "{TAP_PREFIX}*" meta nfproto ipv6 drop',
        f'\t\tiifname "{TAP_PREFIX}*" iifname . ip saddr != @sources drop',
    ]
    link_local_dns = sorted(
        {
            str(a)
            for m in machines
            for a in map(ipaddress.ip_address, m.nameservers)
            if isinstance(a, ipaddress.IPv4Address) and a in _LINK_LOCAL
        }
    )
    if link_local_dns:
        body.append(
            f'\t\tiifname "{TAP_PREFIX}*" ip daddr {{ {", ".join(link_local_dns)} }} '
            "meta l4proto { tcp, udp } th dport 53 accept"
        )
    body += [f'\t\tiifname "{TAP_PREFIX}*" ip daddr {{ 127.0.0.0/8, {_LINK_LOCAL} }} drop', "\t}"]
    body += [
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        f'\t\tiifname "{TAP_PREFIX}*" ct state established,related accept',
        f'\t\toifname "{TAP_PREFIX}*" ct state established,related accept',
    ]
    body += [f"\t\tiifname @nw_{n} oifname @nw_{n} accept" for n in sorted(networks)]
    # a published port is public: any machine may reach it through a host address
    body += [f'\t\tiifname "{TAP_PREFIX}*" oifname "{TAP_PREFIX}*" ct status dnat accept']
    body += [f'\t\tiifname "{TAP_PREFIX}*" oifname "{TAP_PREFIX}*" drop']
    if not egress:
        # no masquerade is not enough: routed as they are, a guest's packets still
        # reached networks that route back to the host (a docker0 neighbour)
        body += [f'\t\tiifname "{TAP_PREFIX}*" drop']
    body += ["\t}"]
    body += _published_maps(machines)
    for chain, hook, prio in (("prerouting", "prerouting", "dstnat"), ("output", "output", "-100")):
        body += [f"\tchain {chain} {{", f"\t\ttype nat hook {hook} priority {prio}; policy accept;"]
        body += [f"\t\t{r}" for r in _DNAT_RULES]
        body.append("\t}")
    body += [
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        f'\t\toifname "{TAP_PREFIX}*" ip saddr 127.0.0.0/8 masquerade',
        # a machine reaching a published port through a host address (its own: hairpin)
        # sees the host as the client, so that the reply comes back through the host
        f'\t\tiifname "{TAP_PREFIX}*" oifname "{TAP_PREFIX}*" ct status dnat masquerade',
    ]
    if egress:
        body.append(f'\t\tip saddr {subnet} oifname != "{TAP_PREFIX}*" masquerade')
    body.append("\t}")
    out.append(f"table {TABLE_FAMILY} {TABLE_NAME} {{")
    if owner is not None:
        out.append(f'\tcomment "{owner}"')
    out += body
    out.append("}")
    return "\n".join(out) + "\n"
