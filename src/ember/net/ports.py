"""``-p [[HOST_IP:][HOST_PORT[-END]]:]GUEST_PORT[-END][/tcp|udp]`` (pure).

Docker's forms: ``HOST:GUEST`` publishes a fixed host port; ``GUEST`` alone (or
an empty host port, ``127.0.0.1::80``) leaves the host port to choose from the
host's ephemeral range; a host range for one guest port (``8000-8010:80``)
leaves it to choose from that range.  Choosing needs the host (which ports are
taken, which are bound): ``pick_host_port`` takes both as arguments.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from ember.net.errors import InvalidPortSpec

PROTOCOLS = ("tcp", "udp")
#: ports one ``-p`` range may publish (each is a DNAT rule)
MAX_RANGE = 1024
#: ports one machine may publish in all: every new connection of the host, its own
#: loopback ones too, walks the DNAT rules (20 ranges of 1024 made a local connect
#: ~90x slower)
MAX_PORTS = 1024
#: Linux's default ``net.ipv4.ip_local_port_range``
DEFAULT_EPHEMERAL = range(32768, 61000)


@dataclass(frozen=True)
class PortMapping:
    #: 0: still to choose (from ``host_range``, else from the host's ephemeral range)
    host_port: int
    guest_port: int
    protocol: str = "tcp"
    #: None: every local address of the host
    host_ip: str | None = None
    #: FIRST, LAST (inclusive) of the host ports to choose from, for ``host_port`` 0
    host_range: tuple[int, int] | None = None
    #: the host port was chosen by ember: a later start may choose again if it is taken
    auto: bool = False

    @property
    def chosen(self) -> bool:
        return self.host_port != 0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "protocol": self.protocol,
        }
        if self.host_range is not None:
            out["host_range"] = list(self.host_range)
        if self.auto:
            out["auto"] = True
        return out

    @classmethod
    def from_json(cls, d: dict[str, object]) -> PortMapping:
        """KeyError or ValueError when a field is missing or not of its type, or
        ``host_range`` is not a range of ports (a record on disk may be damaged); the
        ports themselves are check_rules' to check."""
        host_ip = d.get("host_ip")
        bounds = d.get("host_range")
        host_range = None
        if isinstance(bounds, list) and len(bounds) == 2:
            low, high = bounds
            host_range = (_stored_int(low, "host_range"), _stored_int(high, "host_range"))
            # (set-up walks it to choose a port: a damaged record must not make it walk 10**12)
            if not 1 <= host_range[0] <= host_range[1] <= 65535:
                raise ValueError(f"host_range {bounds!r:.60} is not a range of ports")
        return cls(
            host_port=_stored_int(d["host_port"], "host_port"),
            guest_port=_stored_int(d["guest_port"], "guest_port"),
            protocol=str(d.get("protocol", "tcp")),
            host_ip=str(host_ip) if host_ip is not None else None,
            host_range=host_range,
            auto=d.get("auto") is True,
        )

    def __str__(self) -> str:
        host = f"{self.host_ip}:" if self.host_ip else ""
        if self.chosen:
            port = str(self.host_port)
        elif self.host_range is not None:
            port = f"{self.host_range[0]}-{self.host_range[1]}"
        else:
            port = "(any)"
        return f"{host}{port}->{self.guest_port}/{self.protocol}"


def _stored_int(value: object, what: str) -> int:
    if type(value) is not int:
        raise ValueError(f"{what} {value!r:.40} is not an integer")
    return value


def _port(text: str, where: str) -> int:
    """``where``: what holds the text, for messages (``-p '80:80'``)."""
    # isascii: str.isdigit (and int) take other scripts' digits too
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise InvalidPortSpec(f"invalid port {text[:20]!r} in {where} (expected 1-65535)")
    n = int(text)
    if not 1 <= n <= 65535:
        raise InvalidPortSpec(f"invalid port {text!r} in {where} (expected 1-65535)")
    return n


def _ports(text: str, where: str) -> range:
    """``PORT`` or ``FIRST-LAST`` (inclusive, FIRST <= LAST)."""
    first, dash, last = text.partition("-")
    if not dash:
        n = _port(text, where)
        return range(n, n + 1)
    lo, hi = _port(first, where), _port(last, where)
    if lo > hi:
        raise InvalidPortSpec(f"invalid port range {text!r} in {where} (first > last)")
    if hi - lo + 1 > MAX_RANGE:
        raise InvalidPortSpec(f"port range {text!r} in {where} is longer than {MAX_RANGE}")
    return range(lo, hi + 1)


def _split_protocol(text: str, where: str) -> tuple[str, str]:
    """``PORTS[/PROTO]``: the ports' text and the protocol, tcp when none is named."""
    ports, slash, proto = text.rpartition("/")
    if not slash:
        return text, "tcp"
    proto = proto.lower() or "tcp"  # Docker reads `80/` as 80/tcp
    if proto not in PROTOCOLS:
        raise InvalidPortSpec(f"unknown protocol {proto[:20]!r} in {where} (tcp or udp)")
    return ports, proto


def _host_ip(text: str, spec: str) -> str | None:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidPortSpec(f"invalid host address {text!r} in -p {spec!r}") from None
    if addr.version != 4:
        raise InvalidPortSpec(f"only IPv4 host addresses are supported in -p {spec!r}")
    if addr.is_multicast or addr.is_reserved:
        # a DNAT rule for a group or the broadcast address would take what the host's
        # own programs send there (mDNS, DHCP) to the machine
        raise InvalidPortSpec(f"-p {spec!r}: {addr} is not a unicast address")
    return None if addr.is_unspecified else str(addr)


def check_port_count(ports: Sequence[PortMapping]) -> None:
    """At most MAX_PORTS published ports for one machine, however many ``-p``/``-P``."""
    if len(ports) > MAX_PORTS:
        raise InvalidPortSpec(
            f"{len(ports)} published ports: a machine publishes at most {MAX_PORTS}"
        )


def parse_publish(spec: str) -> tuple[PortMapping, ...]:
    """Parse one ``-p`` value: one mapping per guest port.  Equal host and guest ranges
    pair their ports in order (``-p 8000-8002:9000-9002``); host ports left to choose
    have ``host_port`` 0.  IPv6 host addresses are not supported (yet)."""
    text, proto = _split_protocol(spec.strip(), f"-p {spec!r}")
    parts = text.split(":")
    host_ip: str | None = None
    if len(parts) == 1:
        host_port, guest_port = "", parts[0]
    elif len(parts) == 2:
        host_port, guest_port = parts
    elif len(parts) == 3:
        host_ip = _host_ip(parts[0], spec)
        host_port, guest_port = parts[1], parts[2]
    else:
        raise InvalidPortSpec(
            f"invalid -p {spec!r}: expected [[HOST_IP:][HOST_PORT]:]GUEST_PORT[/tcp|udp]"
        )
    guests = _ports(guest_port, f"-p {spec!r}")
    if not host_port or host_port == "0":
        # Docker's `-p 80`, `-p 127.0.0.1::80` and `-p 0:80`: ephemeral host ports
        return tuple(PortMapping(0, g, proto, host_ip) for g in guests)
    hosts = _ports(host_port, f"-p {spec!r}")
    if len(hosts) > 1 and len(guests) == 1:  # one free port of the host range
        return (PortMapping(0, guests[0], proto, host_ip, (hosts[0], hosts[-1])),)
    if len(hosts) != len(guests):
        raise InvalidPortSpec(
            f"invalid -p {spec!r}: the host and guest port ranges must be the same length"
        )
    return tuple(PortMapping(h, g, proto, host_ip) for h, g in zip(hosts, guests, strict=True))


def _is_sctp(key: str) -> bool:
    return key.lower().endswith("/sctp")


def unpublished_exposed(exposed: Iterable[str]) -> list[str]:
    """The image's ``ExposedPorts`` keys that ``-P`` leaves out: sctp ones (Docker
    publishes them; ember publishes tcp and udp)."""
    return [key for key in exposed if _is_sctp(key)]


def exposed_mappings(
    exposed: Iterable[str], published: Iterable[PortMapping] = ()
) -> tuple[PortMapping, ...]:
    """``-P``: a mapping to a host port ember chooses for every port the image's config
    exposes (``ExposedPorts`` keys: ``PORT``, ``PORT/PROTO``, ``FIRST-LAST/PROTO``), but
    those ``published`` (the ``-p`` mappings) already gives a host port, as Docker
    does; sctp ports are left out (tcp and udp only).  The config comes with the
    image: a key that is no port, more than MAX_RANGE keys, or more than MAX_RANGE
    ports in all, raises InvalidPortSpec naming it."""
    keys = list(exposed)
    if len(keys) > MAX_RANGE:  # each may be a range walked in full: bound the work
        raise InvalidPortSpec(
            f"the image names {len(keys)} exposed ports: -P publishes at most {MAX_RANGE}"
        )
    taken = {(m.guest_port, m.protocol) for m in published}
    out: list[PortMapping] = []
    for key in keys:
        if _is_sctp(key):  # Docker publishes it; ember: tcp and udp only (unpublished_exposed)
            continue
        where = f"the image's ExposedPorts {key[:40]!r}"
        text, proto = _split_protocol(key, where)
        for port in _ports(text, where):
            if (port, proto) not in taken:
                taken.add((port, proto))
                out.append(PortMapping(0, port, proto))
        if len(out) > MAX_RANGE:
            raise InvalidPortSpec(f"the image exposes more than {MAX_RANGE} ports: -P publishes at most that many")
    return tuple(out)


def conflicts(a: PortMapping, b: PortMapping) -> bool:
    """Two mappings claim the same host port (an unspecified host IP overlaps every IP)."""
    if a.protocol != b.protocol or a.host_port != b.host_port:
        return False
    return a.host_ip is None or b.host_ip is None or a.host_ip == b.host_ip


def ephemeral_range(text: str) -> range:
    """The host's ephemeral ports from ``/proc/sys/net/ipv4/ip_local_port_range``
    ("FIRST\\tLAST"); Linux's default when the text makes no sense."""
    try:
        lo, hi = (int(x) for x in text.split())
    except ValueError:
        return DEFAULT_EPHEMERAL
    if not 1 <= lo <= hi <= 65535:
        return DEFAULT_EPHEMERAL
    return range(lo, hi + 1)


def pick_host_port(
    wanted: PortMapping,
    taken: Sequence[PortMapping],
    ephemeral: range,
    bindable: Callable[[PortMapping], bool],
    *,
    start: int = 0,
) -> PortMapping | None:
    """``wanted`` with a host port chosen: the first of its candidates (its range, else
    ``ephemeral``; from the ``start``-th on, wrapping round) that no mapping in ``taken``
    claims and ``bindable`` accepts (nothing on the host listens there); None if none is left.

    A port given by the user is kept as it is; one ember chose before (``auto``, a machine
    started again) is kept if it is still free, else chosen again."""
    if wanted.chosen and not wanted.auto:
        return wanted

    def free(candidate: PortMapping) -> bool:
        return not any(conflicts(candidate, t) for t in taken) and bindable(candidate)

    if wanted.chosen and free(wanted):
        return wanted
    candidates = (
        range(wanted.host_range[0], wanted.host_range[1] + 1)
        if wanted.host_range is not None
        else ephemeral
    )
    for port in _rotated(candidates, start):
        candidate = replace(wanted, host_port=port, auto=True)
        if free(candidate):
            return candidate
    return None


def _rotated(ports: range, start: int) -> Iterable[int]:
    if not ports:
        return []
    k = start % len(ports)
    return [*ports[k:], *ports[:k]]
