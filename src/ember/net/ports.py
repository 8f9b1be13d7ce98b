"""``-p [HOST_IP:]HOST_PORT[-END]:GUEST_PORT[-END][/tcp|udp]`` (pure)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ember.net.errors import InvalidPortSpec

PROTOCOLS = ("tcp", "udp")
#: ports one ``-p`` range may publish (each is a DNAT rule)
MAX_RANGE = 1024


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    guest_port: int
    protocol: str = "tcp"
    #: None: every local address of the host
    host_ip: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "protocol": self.protocol,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> PortMapping:
        host_ip = d.get("host_ip")
        return cls(
            host_port=int(d["host_port"]),  # type: ignore[call-overload]
            guest_port=int(d["guest_port"]),  # type: ignore[call-overload]
            protocol=str(d.get("protocol", "tcp")),
            host_ip=str(host_ip) if host_ip is not None else None,
        )

    def __str__(self) -> str:
        host = f"{self.host_ip}:" if self.host_ip else ""
        return f"{host}{self.host_port}->{self.guest_port}/{self.protocol}"


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise InvalidPortSpec(f"invalid port {text!r} in -p {spec!r} (expected 1-65535)")
    n = int(text)
    if not 1 <= n <= 65535:
        raise InvalidPortSpec(f"invalid port {text!r} in -p {spec!r} (expected 1-65535)")
    return n


def _ports(text: str, spec: str) -> range:
    """``PORT`` or ``FIRST-LAST`` (inclusive, FIRST <= LAST)."""
    first, dash, last = text.partition("-")
    if not dash:
        n = _port(text, spec)
        return range(n, n + 1)
    lo, hi = _port(first, spec), _port(last, spec)
    if lo > hi:
        raise InvalidPortSpec(f"invalid port range {text!r} in -p {spec!r} (first > last)")
    if hi - lo + 1 > MAX_RANGE:
        raise InvalidPortSpec(f"port range {text!r} in -p {spec!r} is longer than {MAX_RANGE}")
    return range(lo, hi + 1)


def parse_publish(spec: str) -> tuple[PortMapping, ...]:
    """Parse one ``-p`` value: one mapping, or one per port of equal host and guest ranges
    (Docker's ``-p 8000-8002:9000-9002``).  IPv6 host addresses are not supported (yet)."""
    text = spec.strip()
    proto = "tcp"
    if "/" in text:
        text, proto = text.rsplit("/", 1)
        proto = proto.lower()
        if proto not in PROTOCOLS:
            raise InvalidPortSpec(f"unknown protocol {proto!r} in -p {spec!r} (tcp or udp)")
    parts = text.split(":")
    if len(parts) == 2:
        host_ip = None
        host_port, guest_port = parts
    elif len(parts) == 3:
        host_ip, host_port, guest_port = parts
        try:
            addr = ipaddress.ip_address(host_ip)
        except ValueError:
            raise InvalidPortSpec(f"invalid host address {host_ip!r} in -p {spec!r}") from None
        if addr.version != 4:
            raise InvalidPortSpec(f"only IPv4 host addresses are supported in -p {spec!r}")
        host_ip = str(addr)
        if addr.is_unspecified:
            host_ip = None
    else:
        raise InvalidPortSpec(
            f"invalid -p {spec!r}: expected [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]"
        )
    hosts, guests = _ports(host_port, spec), _ports(guest_port, spec)
    if len(hosts) != len(guests):
        # (Docker picks one free port of a host range for a single guest port: not done)
        raise InvalidPortSpec(
            f"invalid -p {spec!r}: the host and guest port ranges must be the same length"
        )
    return tuple(PortMapping(h, g, proto, host_ip) for h, g in zip(hosts, guests, strict=True))


def conflicts(a: PortMapping, b: PortMapping) -> bool:
    """Two mappings claim the same host port (an unspecified host IP overlaps every IP)."""
    if a.protocol != b.protocol or a.host_port != b.host_port:
        return False
    return a.host_ip is None or b.host_ip is None or a.host_ip == b.host_ip
