"""``-p [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]`` (pure)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ember.net.errors import InvalidPortSpec

PROTOCOLS = ("tcp", "udp")


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


def parse_publish(spec: str) -> PortMapping:
    """Parse one ``-p`` value.  Ranges and IPv6 host addresses are not supported (yet)."""
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
    if "-" in host_port or "-" in guest_port:
        raise InvalidPortSpec(f"port ranges are not supported in -p {spec!r}")
    return PortMapping(_port(host_port, spec), _port(guest_port, spec), proto, host_ip)


def conflicts(a: PortMapping, b: PortMapping) -> bool:
    """Two mappings claim the same host port (an unspecified host IP overlaps every IP)."""
    if a.protocol != b.protocol or a.host_port != b.host_port:
        return False
    return a.host_ip is None or b.host_ip is None or a.host_ip == b.host_ip
