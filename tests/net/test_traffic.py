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
    script = render_ruleset([a, b, c], subnet="172.30.0.0/16", egress=True)
    subprocess.run(["ip", "netns", "exec", host, "nft", "-f", "-"], input=script, text=True,
                   check=True)  # fmt: skip
    srv = subprocess.Popen(
        ["ip", "netns", "exec", g1, sys.executable, "-m", "http.server", "80", "--bind",
         a.guest_ip],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
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
        script = render_ruleset([b, c], subnet="172.30.0.0/16", egress=True)
        subprocess.run(["ip", "netns", "exec", host, "nft", "-f", "-"], input=script,
                       text=True, check=True)  # fmt: skip
        assert fetch(host, "127.0.0.1", 8080).startswith("FAIL")
    finally:
        for p in (srv, udp):
            p.kill()
            p.wait()


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
    script = render_ruleset([a, c], subnet="172.30.0.0/16", egress=True)
    subprocess.run(["ip", "netns", "exec", host, "nft", "-f", "-"], input=script, text=True,
                   check=True)  # fmt: skip
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
