"""Machine records as ember writes them, for tests that make one without a VM."""

from __future__ import annotations

from typing import Any

from ember.net.manager import MachineNetwork
from ember.net.ports import PortMapping


def network_json(ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A record's ``network`` section, from ``MachineNetwork.to_json`` itself, with
    ``ports`` (as ``PortMapping.to_json`` writes them)."""
    return MachineNetwork(
        machine_id="0" * 64, tap="em-000000000000", mac="02:00:0a:58:00:02",
        network="default", guest_ip="10.88.0.2", gateway="10.88.0.1", prefix=24, mtu=1500,
        ports=tuple(PortMapping.from_json(p) for p in ports or []),
    ).to_json()  # fmt: skip
