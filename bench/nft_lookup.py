"""What published ports cost every new connection of the host: ember's ruleset (the
ports as elements of NAT maps: one lookup) against one DNAT rule per port, the way
Docker's iptables ``DOCKER`` chain holds them (and ember's ruleset did until
2026-11-30), with no table as the floor.

In a network namespace of its own, with one machine publishing ``--ports`` ports
(default 1024, the most one machine may publish), it times ``connect()`` to a
closed port on 127.0.0.1 (the kernel answers with a reset: the time is the
netfilter hooks' walk plus the stack's floor), median of ``--connects`` each,
the three settings alternating over ``--runs`` rounds.

    .venv/bin/python bench/nft_lookup.py [--ports 1024] [--runs 5] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine_note, record  # noqa: E402
from ember.net.nftables import TABLE_FAMILY, TABLE_NAME, MachineRules, render_ruleset  # noqa: E402
from ember.net.ports import PortMapping  # noqa: E402

SECTION = "Published ports: cost per new connection (bench/nft_lookup.py)"
GUEST = MachineRules("a" * 12, "em-aaaaaaaaaaaa", "172.30.0.2")


def per_port_rules(ports: list[PortMapping]) -> str:
    """The anchor: a nat table with one DNAT rule per published port."""
    rules = [
        f"\t\tfib daddr type local {p.protocol} dport {p.host_port} dnat ip to "
        f"{GUEST.guest_ip}:{p.guest_port}"
        for p in ports
    ]
    chains = []
    for chain, hook, prio in (("prerouting", "prerouting", "dstnat"), ("output", "output", "-100")):
        chains += [f"\tchain {chain} {{", f"\t\ttype nat hook {hook} priority {prio}; policy accept;"]
        chains += rules
        chains.append("\t}")
    body = "\n".join(chains)
    return (
        f"table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"
        f"table {TABLE_FAMILY} {TABLE_NAME} {{\n{body}\n}}\n"
    )


def connect_us(connects: int) -> float:
    """Median microseconds of a connect() to a closed local port."""
    times = []
    for _ in range(connects):
        s = socket.socket()
        t0 = time.perf_counter()
        with contextlib.suppress(OSError):  # refused: what is timed
            s.connect(("127.0.0.1", 1))
        times.append(time.perf_counter() - t0)
        s.close()
    return statistics.median(times) * 1e6


def in_netns(argv: list[str]) -> int:
    """Run this script again inside a fresh network namespace (deleted after)."""
    name = f"embench-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, __file__, "--inside", *argv]
        ).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ports", type=int, default=1024)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--connects", type=int, default=300)
    p.add_argument("--record", action="store_true", help="append the result to docs/performance.md")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.inside:
        return in_netns(sys.argv[1:])
    ports = [PortMapping(10000 + i, 80) for i in range(args.ports)]
    machine = MachineRules(GUEST.machine_id, GUEST.tap, GUEST.guest_ip, ports=tuple(ports))
    scripts = {
        "no table": f"table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n",
        "ember (maps)": render_ruleset([machine], subnet="172.30.0.0/16", egress=True),
        "a rule per port": per_port_rules(ports),
    }
    results: dict[str, list[float]] = {name: [] for name in scripts}
    for _ in range(args.runs):
        for name, script in scripts.items():
            subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
            connect_us(20)  # warm-up after the change
            results[name].append(connect_us(args.connects))
    subprocess.run(["nft", "delete", "table", TABLE_FAMILY, TABLE_NAME], check=False)
    med = {name: statistics.median(v) for name, v in results.items()}
    for name, value in med.items():
        print(f"{name:>16}: {value:7.1f} us per connect (rounds: "
              f"{', '.join(f'{x:.1f}' for x in results[name])})")  # fmt: skip
    ratio = med["ember (maps)"] / med["a rule per port"]
    print(f"ember / a rule per port: {ratio:.2f}x")
    if args.record:
        record(
            SECTION,
            f"{args.ports} published ports, connect() to a closed local port, medians of "
            f"{args.runs} alternating rounds of {args.connects}: ember's maps "
            f"{med['ember (maps)']:.1f} us, a rule per port {med['a rule per port']:.1f} us, "
            f"no table {med['no table']:.1f} us: {ratio:.2f}x "
            f"(`bench/nft_lookup.py --ports {args.ports} --runs {args.runs} --record`; "
            f"{machine_note()})",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
