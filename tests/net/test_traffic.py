"""ember's nftables rules against real kernel traffic, no VM needed: each "guest" is a
network namespace behind a veth pair whose host end carries a TAP-style ``em-`` name,
so the forward/nat rules match exactly as they do for a machine's TAP."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from ember.net.nftables import MachineRules, render_ruleset
from ember.net.ports import PortMapping
from tests.net.conftest import sh

pytestmark = [pytest.mark.root, pytest.mark.integration]

CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    print(s.recv(64).decode(errors="replace").splitlines()[0])
except OSError as e:
    print("FAIL", e)
"""


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(512)
    s.sendto(b"echo:" + data, peer)
"""

UDP_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(20):  # the echo server may still be starting
    s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recv(512).decode()); break
    except OSError:
        time.sleep(0.1)
else:
    print("FAIL")
"""


def udp_ask(ns: str, host: str, port: int) -> str:
    res = sh("ip", "netns", "exec", ns, sys.executable, "-c", UDP_CLIENT, host, str(port))
    return res.stdout.strip()


def fetch(ns: str, host: str, port: int) -> str:
    res = sh("ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, host, str(port))
    return res.stdout.strip()


def attach_guest(host_ns: str, guest_ns: str, tap: str, gw: str, ip: str) -> None:
    sh("ip", "-n", host_ns, "link", "add", tap, "type", "veth", "peer", "name", "eth0",
       "netns", guest_ns)  # fmt: skip
    sh("ip", "-n", host_ns, "addr", "add", f"{gw}/30", "dev", tap)
    sh("ip", "-n", host_ns, "link", "set", tap, "up")
    sh("ip", "-n", guest_ns, "addr", "add", f"{ip}/30", "dev", "eth0")
    sh("ip", "-n", guest_ns, "link", "set", "eth0", "up")
    sh("ip", "-n", guest_ns, "route", "add", "default", "via", gw)


def load_rules(host: str, machines: list[MachineRules], *, egress: bool) -> None:
    """ember's ruleset for ``machines``, loaded in the namespace standing for the host."""
    script = render_ruleset(machines, subnet="172.30.0.0/16", egress=egress)
    subprocess.run(["ip", "netns", "exec", host, "nft", "-f", "-"], input=script, text=True,
                   check=True)  # fmt: skip


def http_server(ns: str, address: str) -> subprocess.Popen[bytes]:
    """An HTTP server on ``address``:80 in namespace ``ns`` (a guest's program)."""
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "80", "--bind", address],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def test_published_port_and_isolation(make_netns: Callable[[], str]) -> None:
    host, g1, g2, g3 = (make_netns() for _ in range(4))
    a = MachineRules(
        "a" * 12,
        "em-aaaaaaaaaaaa",
        "172.30.0.2",
        ports=(PortMapping(8080, 80), PortMapping(5353, 53, "udp", "127.0.0.1")),
    )
    b = MachineRules("b" * 12, "em-bbbbbbbbbbbb", "172.30.0.6", network="tenant_b")
    c = MachineRules("c" * 12, "em-cccccccccccc", "172.30.0.10")
    attach_guest(host, g1, a.tap, "172.30.0.1", a.guest_ip)
    attach_guest(host, g2, b.tap, "172.30.0.5", b.guest_ip)
    attach_guest(host, g3, c.tap, "172.30.0.9", c.guest_ip)
    # what NetworkManager does on the host besides creating the TAP
    sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "netns", "exec", host, "sysctl", "-qw", f"net.ipv4.conf.{a.tap}.route_localnet=1")
    load_rules(host, [a, b, c], egress=True)
    srv = http_server(g1, a.guest_ip)
    udp = subprocess.Popen(
        ["ip", "netns", "exec", g1, sys.executable, "-c", UDP_ECHO, a.guest_ip, "53"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            if fetch(host, a.guest_ip, 80).startswith("HTTP/"):
                break
            time.sleep(0.1)
        # published port from the host itself: loopback and the host's own address
        assert fetch(host, "127.0.0.1", 8080).startswith("HTTP/1.0 200")
        assert fetch(host, "172.30.0.9", 8080).startswith("HTTP/1.0 200")
        # UDP on a given host address (loopback)
        assert udp_ask(host, "127.0.0.1", 5353) == "echo:ping"
        # same network (default): allowed; other network: dropped
        assert fetch(g3, a.guest_ip, 80).startswith("HTTP/1.0 200")
        assert fetch(g2, a.guest_ip, 80).startswith("FAIL")
        # a published port is public, as with Docker: another network's machine reaches
        # it through a host address, and so does the machine itself (hairpin)
        assert fetch(g2, "172.30.0.5", 8080).startswith("HTTP/1.0 200")
        assert fetch(g1, "172.30.0.1", 8080).startswith("HTTP/1.0 200")
        assert fetch(g1, "172.30.0.9", 8080).startswith("HTTP/1.0 200")
        assert fetch(g2, a.guest_ip, 80).startswith("FAIL")  # still only the published port
        # after the machine is gone the port is no longer published
        load_rules(host, [b, c], egress=True)
        assert fetch(host, "127.0.0.1", 8080).startswith("FAIL")
    finally:
        for p in (srv, udp):
            p.kill()
            p.wait()


def test_without_egress_machines_of_a_network_reach_each_other(
    make_netns: Callable[[], str],
) -> None:
    """The host routes between two machines' TAPs: with egress off and no published
    ports nothing turned forwarding on, and machines of one network could not reach
    each other.  Forwarding on the TAPs alone (what ``tap.create_tap`` sets) lets them,
    while the host routes nothing else (ip_forward stays off)."""
    from ember.net.tap import PROC_NET

    host, g1, g2 = (make_netns() for _ in range(3))
    # a new namespace starts with the host's ip_forward (and its TAPs with its default
    # forwarding): off here, as on a fresh host
    sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    a = MachineRules("a" * 12, "em-aaaaaaaaaaaa", "172.30.0.2")
    b = MachineRules("b" * 12, "em-bbbbbbbbbbbb", "172.30.0.6")
    attach_guest(host, g1, a.tap, "172.30.0.1", a.guest_ip)
    attach_guest(host, g2, b.tap, "172.30.0.5", b.guest_ip)
    load_rules(host, [a, b], egress=False)
    srv = http_server(g1, a.guest_ip)
    try:
        for _ in range(100):
            if fetch(host, a.guest_ip, 80).startswith("HTTP/"):
                break
            time.sleep(0.1)
        assert fetch(g2, a.guest_ip, 80).startswith("FAIL")  # nothing forwards
        for tap in (a.tap, b.tap):
            sh("ip", "netns", "exec", host, "sh", "-c",
               f"echo 1 > {PROC_NET}/conf/{tap}/forwarding")  # fmt: skip
        assert fetch(g2, a.guest_ip, 80).startswith("HTTP/1.0 200")
    finally:
        srv.kill()
        srv.wait()


UDP_LOG = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(512)
    print(peer[0], data.decode(), flush=True)
"""

UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for _ in range(5):
    s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
"""


def test_a_guest_reaches_neither_host_loopback_nor_passes_for_another(
    make_netns: Callable[[], str],
) -> None:
    """A hostile guest of a machine with a published loopback port (its TAP has
    route_localnet) routes 127.0.0.1 to the gateway: the host's loopback-only
    service stays out of reach (CVE-2020-8558's class).  And a guest that takes
    another machine's address as its source is dropped."""
    host, g1, g3 = make_netns(), make_netns(), make_netns()
    a = MachineRules("a" * 12, "em-aaaaaaaaaaaa", "172.30.0.2",
                     ports=(PortMapping(8080, 80, "tcp", "127.0.0.1"),))  # fmt: skip
    c = MachineRules("c" * 12, "em-cccccccccccc", "172.30.0.10")
    attach_guest(host, g1, a.tap, "172.30.0.1", a.guest_ip)
    attach_guest(host, g3, c.tap, "172.30.0.9", c.guest_ip)
    sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "netns", "exec", host, "sysctl", "-qw", f"net.ipv4.conf.{a.tap}.route_localnet=1")
    sh("ip", "-n", host, "link", "set", "lo", "up")
    load_rules(host, [a, c], egress=True)
    # the guest's side of the trick: 127.0.0.1 is not local but behind the gateway
    for key in ("all", "eth0"):
        sh("ip", "netns", "exec", g1, "sysctl", "-qw", f"net.ipv4.conf.{key}.route_localnet=1")
        sh("ip", "netns", "exec", g1, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
        sh("ip", "netns", "exec", g1, "sysctl", "-qw", f"net.ipv4.conf.{key}.accept_local=1")
    sh("ip", "-n", g1, "route", "del", "local", "127.0.0.1", "dev", "lo", "table", "local",
       check=False)  # fmt: skip
    sh("ip", "-n", g1, "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local",
       check=False)  # fmt: skip
    sh("ip", "-n", g1, "route", "add", "127.0.0.1/32", "via", "172.30.0.1", "dev", "eth0")
    secret = subprocess.Popen(
        ["ip", "netns", "exec", host, sys.executable, "-m", "http.server", "8099", "--bind",
         "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log = subprocess.Popen(
        ["ip", "netns", "exec", host, sys.executable, "-c", UDP_LOG, "9999"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        for _ in range(100):
            if fetch(host, "127.0.0.1", 8099).startswith("HTTP/"):
                break
            time.sleep(0.1)
        else:  # else the FAIL below would prove nothing
            pytest.fail("the loopback-only server never answered on the host")
        assert fetch(g1, "127.0.0.1", 8099).startswith("FAIL")
        # machine c sends once as itself, then as machine a: only the first arrives
        sh("ip", "-n", g3, "addr", "add", f"{a.guest_ip}/32", "dev", "eth0")
        send = [sys.executable, "-c", UDP_SEND]
        assert log.stdout is not None
        out = log.stdout.fileno()  # read unbuffered: select() sees what is still to read
        seen: list[str] = []
        partial = b""

        def heard(word: str, timeout: float = 0.3) -> bool:
            """The logger's lines read until ``word`` is among them or ``timeout`` s have
            passed, then until it has been quiet for 0.3 s: whether ``word`` came."""
            nonlocal partial
            deadline = time.monotonic() + timeout
            while True:
                found = any(word in line for line in seen)
                wait = 0.3 if found else deadline - time.monotonic()
                if wait <= 0 or not select.select([out], [], [], wait)[0]:
                    return found
                data = os.read(out, 4096)
                if not data:
                    return found
                *lines, partial = (partial + data).split(b"\n")
                seen.extend(line.decode(errors="replace").strip() for line in lines)

        for _ in range(30):  # the logger may still be starting
            sh("ip", "netns", "exec", g3, *send, c.guest_ip, "172.30.0.9", "9999", "honest")
            if heard("honest"):
                break
        sh("ip", "netns", "exec", g3, *send, a.guest_ip, "172.30.0.9", "9999", "spoofed")
        sh("ip", "netns", "exec", g3, *send, c.guest_ip, "172.30.0.9", "9999", "end")
        assert heard("end", timeout=30), seen  # sent after "spoofed": that had its chance
        assert not any("spoofed" in line for line in seen), seen
        assert f"{c.guest_ip} honest" in seen and any("end" in line for line in seen), seen
    finally:
        for p in (secret, log):
            p.kill()
            p.wait()


RA_SEND = """
import socket, struct, sys, time
idx = socket.if_nametoindex("eth0")
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
# a router advertisement (lifetime 1800 s) with an autoconfiguration prefix
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
ra += struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0,
                  socket.inet_pton(socket.AF_INET6, sys.argv[1]))
for _ in range(10):
    s.sendto(ra, ("ff02::1", 0, 0, idx))
    time.sleep(0.1)
"""


def _ipv6_ready(ns: str, dev: str) -> None:
    """Until ``dev`` has a link-local address past duplicate address detection (the
    source a router advertisement needs)."""
    for _ in range(100):
        out = sh("ip", "-n", ns, "-6", "addr", "show", "dev", dev, "scope", "link").stdout
        if "inet6" in out and "tentative" not in out:
            return
        time.sleep(0.1)
    pytest.fail(f"{dev} in {ns} never got a link-local address")


def test_a_guest_can_neither_route_the_hosts_ipv6_nor_reach_link_local_or_leave_without_egress(
    make_netns: Callable[[], str],
) -> None:
    """Review findings: a guest's router advertisement gave the host a default IPv6
    route through the guest; a guest reached 169.254.169.254 (a cloud host's metadata,
    credentials) NATed as the host; and with egress off it still reached networks that
    route back to the host (a docker0 neighbour), only without the masquerade."""
    host, g1, ctl, world = (make_netns() for _ in range(4))
    # its resolver is the metadata address, as on GCE: DNS there must still work
    a = MachineRules("a" * 12, "em-aaaaaaaaaaaa", "172.30.0.2", ports=(PortMapping(8080, 80),),
                     nameservers=("169.254.169.254",))  # fmt: skip
    attach_guest(host, g1, a.tap, "172.30.0.1", a.guest_ip)
    # a control "guest" on an interface ember does not name: its advertisement is taken,
    # which shows that the one on ember's TAP would have been
    attach_guest(host, ctl, "vx-control", "192.168.77.1", "192.168.77.2")
    # the world: a neighbour 10.0.0.2 that routes back through the host, and the
    # metadata address behind it
    sh("ip", "-n", host, "link", "add", "up0", "type", "veth", "peer", "name", "eth0",
       "netns", world)  # fmt: skip
    sh("ip", "-n", host, "addr", "add", "10.0.0.1/24", "dev", "up0")
    sh("ip", "-n", host, "link", "set", "up0", "up")
    sh("ip", "-n", host, "route", "add", "169.254.169.254/32", "via", "10.0.0.2")
    sh("ip", "-n", world, "addr", "add", "10.0.0.2/24", "dev", "eth0")
    sh("ip", "-n", world, "addr", "add", "169.254.169.254/32", "dev", "lo")
    sh("ip", "-n", world, "link", "set", "eth0", "up")
    sh("ip", "-n", world, "route", "add", "default", "via", "10.0.0.1")
    sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "netns", "exec", host, "sysctl", "-qw", f"net.ipv4.conf.{a.tap}.route_localnet=1")

    def rules(egress: bool) -> None:
        load_rules(host, [a], egress=egress)

    servers = [
        subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "80"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for ns in (world, g1)
    ]  # fmt: skip
    servers.append(subprocess.Popen(
        ["ip", "netns", "exec", world, sys.executable, "-c", UDP_ECHO, "169.254.169.254", "53"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    try:
        rules(egress=True)
        for _ in range(100):
            if fetch(host, "10.0.0.2", 80).startswith("HTTP/") and fetch(
                host, a.guest_ip, 80
            ).startswith("HTTP/"):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the test's servers never answered")
        assert fetch(host, "169.254.169.254", 80).startswith("HTTP/1.0 200")  # it is there
        # egress on: out it goes, but not to link-local addresses
        assert fetch(g1, "10.0.0.2", 80).startswith("HTTP/1.0 200")
        assert fetch(g1, "169.254.169.254", 80).startswith("FAIL")
        assert udp_ask(g1, "169.254.169.254", 53) == "echo:ping"  # but its DNS resolver
        # egress off: nothing leaves; replies of a published port still do
        rules(egress=False)
        assert fetch(g1, "10.0.0.2", 80).startswith("FAIL")
        assert fetch(host, "127.0.0.1", 8080).startswith("HTTP/1.0 200")
        assert fetch(world, "10.0.0.1", 8080).startswith("HTTP/1.0 200")

        # IPv6: router advertisements from the guest and from the control
        for ns, dev in ((g1, "eth0"), (ctl, "eth0"), (host, a.tap), (host, "vx-control")):
            _ipv6_ready(ns, dev)
        for ns, prefix in ((g1, "2001:db8:66::"), (ctl, "2001:db8:77::")):
            sh("ip", "netns", "exec", ns, sys.executable, "-c", RA_SEND, prefix)
        routes = ""
        for _ in range(50):
            routes = sh("ip", "-n", host, "-6", "route", "show").stdout
            if "2001:db8:77::/64" in routes:
                break
            time.sleep(0.1)
        assert "2001:db8:77::/64" in routes, f"the control advertisement was not taken: {routes}"
        assert "2001:db8:66" not in routes and a.tap not in routes.split("default")[-1], routes
        assert "2001:db8:66" not in sh("ip", "-n", host, "-6", "addr").stdout
    finally:
        for p in servers:
            p.kill()
            p.wait()
