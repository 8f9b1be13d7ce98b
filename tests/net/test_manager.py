"""NetworkManager for real, run inside a network namespace the test creates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ember.net.manager import host_nameservers, tap_name
from tests.net.conftest import sh

pytestmark = [pytest.mark.root, pytest.mark.integration]

ID_A = "a1" * 32
ID_B = "b2" * 32
ID_C = "c3" * 32

#: what every script run in the netns starts with: argv[1] the state directory
PRELUDE = """
import json, socket, subprocess, sys
from pathlib import Path
from ember.home import Home
from ember.net.manager import NetworkManager, NetConfig
from ember.net.ports import parse_publish
from ember.errors import EmberError

home = Home(Path(sys.argv[1]))
mgr = NetworkManager(home, NetConfig(nameservers=("192.0.2.53",)))
out = {}
"""


def run_in_netns(netns: str, script: str, state: Path) -> dict[str, Any]:
    """Run ``PRELUDE + script`` in ``netns`` with the three machine ids; what it printed."""
    res = sh("ip", "netns", "exec", netns, sys.executable, "-c", PRELUDE + script, str(state),
             ID_A, ID_B, ID_C, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


SCRIPT = """
def links():
    return sorted(l["ifname"] for l in json.loads(subprocess.run(
        ["ip", "-j", "link"], capture_output=True, text=True).stdout) if l["ifname"] != "lo")
def addrs(dev):
    j = json.loads(subprocess.run(["ip", "-j", "addr", "show", dev], capture_output=True,
                                  text=True).stdout)
    return [f"{a['local']}/{a['prefixlen']}" for a in j[0]["addr_info"] if a["family"] == "inet"]
def nft():
    r = subprocess.run(["nft", "list", "table", "inet", "ember"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None

a = mgr.setup(sys.argv[2], ports=parse_publish("8080:80"))
b = mgr.setup(sys.argv[3], network="tenant-b")  # (Docker's names have dashes)
out["a"], out["b"] = a.to_json(), b.to_json()
out["links"] = links()
out["addr_a"] = addrs(a.tap)
out["route_localnet_a"] = Path(f"/proc/sys/net/ipv4/conf/{a.tap}/route_localnet").read_text().strip()
out["forwarding"] = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
out["nft"] = nft()
try:
    mgr.setup(sys.argv[4], ports=parse_publish("127.0.0.1:8080:81"))
except EmberError as e:
    out["conflict"] = [type(e).__name__, str(e)]
out["links_after_conflict"] = links()
mgr.teardown(sys.argv[2])
out["links_after_a"] = links()
out["nft_after_a"] = nft()
c = mgr.setup(sys.argv[4], ports=parse_publish("8080:80"))   # reuses a's slot and port
out["c"] = c.to_json()
mgr.teardown(sys.argv[2])  # again: idempotent
mgr.teardown(sys.argv[3]); mgr.teardown(sys.argv[4])
out["links_end"] = links()
out["nft_end"] = nft()
out["state_end"] = json.loads((home.root / "net" / "state.json").read_text())["machines"]
print(json.dumps(out))
"""


def test_setup_teardown_in_netns(netns: str, tmp_path: Path) -> None:
    out = run_in_netns(netns, SCRIPT, tmp_path)
    a, b = out["a"], out["b"]
    assert a["tap"] == tap_name(ID_A) == "em-a1a1a1a1a1a1"
    assert (a["gateway"], a["guest_ip"], a["prefix"]) == ("172.30.0.1", "172.30.0.2", 30)
    assert (b["gateway"], b["guest_ip"]) == ("172.30.0.5", "172.30.0.6")
    assert a["nameservers"] == ["192.0.2.53"]
    assert out["links"] == ["em-a1a1a1a1a1a1", "em-b2b2b2b2b2b2"]
    assert out["addr_a"] == ["172.30.0.1/30"]
    assert out["route_localnet_a"] == "1" and out["forwarding"] == "1"
    assert "tcp . 8080 : 172.30.0.2 . 80" in out["nft"]
    assert "nw_tenant-b" in out["nft"]
    assert out["conflict"][0] == "PortConflict" and "8080/tcp" in out["conflict"][1]
    assert out["links_after_conflict"] == out["links"]
    assert out["links_after_a"] == ["em-b2b2b2b2b2b2"]
    assert "172.30.0.2 . 80" not in out["nft_after_a"]
    assert out["c"]["guest_ip"] == "172.30.0.2"
    assert out["links_end"] == [] and out["nft_end"] is None and out["state_end"] == {}


def test_without_egress_or_ports_a_tap_still_forwards_and_has_the_configured_mtu(
    netns: str, tmp_path: Path
) -> None:
    """With egress off and no ports nothing turned forwarding on: machines of one
    network, which the host routes between, could not reach each other
    (tests/net/test_traffic.py shows the traffic); and the TAP kept MTU 1500 whatever
    network.mtu gave the guest."""
    out = run_in_netns(netns, """
# (a new namespace starts with the host's ip_forward: off here, as on a fresh host)
Path("/proc/sys/net/ipv4/ip_forward").write_text("0")
mgr = NetworkManager(home, NetConfig(nameservers=("192.0.2.53",), egress=False, mtu=1400))
a = mgr.setup(sys.argv[2])
link = json.loads(subprocess.run(["ip", "-j", "link", "show", a.tap], capture_output=True,
                                 text=True).stdout)[0]
out["mtu"], out["guest_mtu"] = link["mtu"], a.mtu
out["tap_forwarding"] = Path(f"/proc/sys/net/ipv4/conf/{a.tap}/forwarding").read_text().strip()
out["ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
mgr.teardown(sys.argv[2])
print(json.dumps(out))
""", tmp_path)  # fmt: skip
    assert out["mtu"] == out["guest_mtu"] == 1400
    assert out["tap_forwarding"] == "1"
    assert out["ip_forward"] == "0"  # egress off: the host routes for no one else


def test_a_subnet_the_host_routes_elsewhere_is_refused(netns: str, tmp_path: Path) -> None:
    sh("ip", "-n", netns, "link", "add", "vpn0", "type", "veth", "peer", "name", "vpn1")
    sh("ip", "-n", netns, "addr", "add", "172.30.5.1/24", "dev", "vpn0")
    for end in ("vpn0", "vpn1"):
        sh("ip", "-n", netns, "link", "set", end, "up")
    out = run_in_netns(netns, """
try:
    mgr.setup(sys.argv[2])
except EmberError as e:
    out["refused"] = str(e)
out["links"] = sorted(socket.if_nameindex())
mgr = NetworkManager(home, NetConfig(nameservers=("192.0.2.53",), subnet="10.77.0.0/16"))
out["other"] = mgr.setup(sys.argv[2]).guest_ip
mgr.teardown(sys.argv[2])
print(json.dumps(out))
""", tmp_path)  # fmt: skip
    assert "overlaps this host's network 172.30.5.0/24 (on vpn0)" in out["refused"]
    assert "network.subnet" in out["refused"]
    assert not any(name.startswith("em-") for _, name in out["links"])
    assert out["other"] == "10.77.0.2"


def test_host_nameservers_skip_loopback() -> None:
    conf = "# x\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nnameserver fe80::1%eth0\nsearch lan\nnameserver bogus\n"
    assert host_nameservers(conf) == ("10.0.0.2",)


CHOOSE_SCRIPT = """
busy = socket.socket()
busy.bind(("127.0.0.1", 9000))  # a program of the host holds 9000 (on one address)
busy.listen()
a = mgr.setup(sys.argv[2], ports=parse_publish("9000-9002:80"))
out["a"] = [p.to_json() for p in a.ports]
held = socket.socket()
held.bind(("0.0.0.0", 9002))  # while a runs, 9002 is the only one left: held too
try:
    mgr.setup(sys.argv[3], ports=parse_publish("9000-9002:81"))
except EmberError as e:
    out["full"] = [type(e).__name__, str(e)]
held.close()
c = mgr.setup(sys.argv[4], ports=parse_publish("80") + parse_publish("53/udp") + parse_publish("8080:81"))
out["c"] = [p.to_json() for p in c.ports]
out["range"] = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
try:
    mgr.setup(sys.argv[3], ports=parse_publish("10.9.9.9::80"))
except EmberError as e:
    out["foreign"] = [type(e).__name__, str(e)]
out["nft"] = subprocess.run(["nft", "list", "table", "inet", "ember"], capture_output=True, text=True).stdout
# a port given explicitly that a program of the host serves is refused, not shadowed
# (on any of its addresses: 9000 is held on 127.0.0.1 only)
for i, spec in enumerate(("9000:80", "127.0.0.1:9000:80", "5353:53/udp")):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 5353))
    try:
        mgr.setup(sys.argv[3], ports=parse_publish(spec))
        out[f"explicit_{i}"] = None
    except EmberError as e:
        out[f"explicit_{i}"] = [type(e).__name__, str(e)]
    udp.close()
# a closed connection's TIME_WAIT on an explicit port does not count as a program there
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 9500)); srv.listen()
cli = socket.create_connection(("127.0.0.1", 9500))
conn, _ = srv.accept()
conn.close()  # the server side closes first: its end waits in TIME_WAIT on port 9500
cli.close(); srv.close()
out["time_wait"] = [p.host_port for p in mgr.setup(sys.argv[3], ports=parse_publish("9500:80")).ports]
mgr.teardown(sys.argv[3])
out["state"] = {k[:2]: v["ports"] for k, v in json.loads((home.root / "net" / "state.json").read_text())["machines"].items()}
for m in sys.argv[2:5]:
    mgr.teardown(m)
out["again"] = mgr.setup(sys.argv[2], ports=a.ports).ports[0].host_port
mgr.teardown(sys.argv[2])
mgr.setup(sys.argv[3], ports=parse_publish("9001:81"))
out["taken_meanwhile"] = mgr.setup(sys.argv[2], ports=a.ports).ports[0].host_port
mgr.teardown(sys.argv[2]); mgr.teardown(sys.argv[3])
print(json.dumps(out))
"""


def test_host_ports_left_open_are_chosen_free(netns: str, tmp_path: Path) -> None:
    out = run_in_netns(netns, CHOOSE_SCRIPT, tmp_path)
    # 9000 is bound by a program (even on one address only): the range's next port
    assert out["a"] == [{"host_ip": None, "host_port": 9001, "guest_port": 80, "protocol": "tcp",
                         "host_range": [9000, 9002], "auto": True}]  # fmt: skip
    assert out["full"][0] == "PortConflict" and "9000-9002" in out["full"][1]
    lo, hi = (int(x) for x in out["range"])
    tcp, udp, fixed = out["c"]
    assert lo <= tcp["host_port"] <= hi and tcp["guest_port"] == 80 and tcp["protocol"] == "tcp"
    assert lo <= udp["host_port"] <= hi and udp["protocol"] == "udp"
    assert fixed["host_port"] == 8080
    assert out["foreign"][0] == "InvalidPortSpec" and "10.9.9.9" in out["foreign"][1]
    for i, where in enumerate(("9000/tcp", "127.0.0.1:9000/tcp", "5353/udp")):
        assert out[f"explicit_{i}"][0] == "PortConflict", out[f"explicit_{i}"]
        assert f"host port {where} is in use by a program on this host" in out[f"explicit_{i}"][1]
    assert out["time_wait"] == [9500]
    assert f"tcp . {tcp['host_port']} : " in out["nft"] and f"udp . {udp['host_port']} : " in out["nft"]
    assert "tcp . 9001 : " in out["nft"]
    # what is recorded (and what `ember ps` and `ember start` read) is the chosen port
    assert out["state"]["a1"][0]["host_port"] == 9001
    assert out["state"]["c3"][0]["host_port"] == tcp["host_port"]
    # started again (ember start sets the network up from the recorded ports): the
    # same port while it is free, another of the range once a machine took it
    assert out["again"] == 9001
    assert out["taken_meanwhile"] == 9002


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"egress": "false"}, "network.egress in config.json must be true or false"),
        ({"prefix": "x"}, "network.prefix in config.json must be an integer"),
        ({"prefix": None}, "network.prefix in config.json must be an integer"),
        ({"prefix": True}, "network.prefix in config.json must be an integer"),
        ({"mtu": "x"}, "network.mtu in config.json must be an integer"),
        ({"mtu": 10}, "network.mtu in config.json must be 576-65535"),
        ({"nameservers": "1.1.1.1"}, "network.nameservers in config.json must be a list"),
        ({"nameservers": ["1.1.1.1", "dns.example"]}, "'dns.example' is not an IP address"),
        ({"subnet": 10}, "network.subnet in config.json must be a string"),
    ],
)
def test_network_config_of_the_wrong_type_is_refused(
    tmp_path: Path, section: dict[str, Any], message: str
) -> None:
    """``"egress": "false"`` left egress on (bool("false")); a string prefix was a
    traceback; a nameserver given as a string was ignored."""
    from ember.home import Home
    from ember.net.errors import NetworkError
    from ember.net.manager import NetConfig

    (tmp_path / "config.json").write_text(json.dumps({"network": section}))
    with pytest.raises(NetworkError, match=re.escape(message)):
        NetConfig.load(Home(tmp_path))


def test_network_config_read(tmp_path: Path) -> None:
    from ember.home import Home
    from ember.net.manager import NetConfig

    section = {"egress": False, "mtu": 1400, "nameservers": ["192.0.2.1"], "prefix": 31}
    (tmp_path / "config.json").write_text(json.dumps({"network": section}))
    cfg = NetConfig.load(Home(tmp_path))
    assert (cfg.egress, cfg.mtu, cfg.nameservers, cfg.prefix) == (False, 1400, ("192.0.2.1",), 31)
    assert NetConfig.load(Home(tmp_path / "none")) == NetConfig()


def test_a_subnet_written_with_a_netmask_is_kept_as_its_network(tmp_path: Path) -> None:
    """`10.0.0.0/255.0.0.0` passed the config's check, then every machine's setup failed
    rendering the ruleset ("invalid machine subnet")."""
    from ember.home import Home
    from ember.net.manager import NetConfig
    from ember.net.nftables import MachineRules, render_ruleset

    (tmp_path / "config.json").write_text(json.dumps({"network": {"subnet": "10.0.0.0/255.0.0.0"}}))
    cfg = NetConfig.load(Home(tmp_path))
    assert cfg.subnet == "10.0.0.0/8"
    machine = MachineRules("aaaaaaaaaaaa0000", "em-aaaaaaaaaaaa", "10.0.0.2")
    assert "10.0.0.0/8" in render_ruleset([machine], subnet=cfg.subnet, egress=True)


def test_damaged_network_state_says_what_to_do(tmp_path: Path) -> None:
    from ember.home import Home
    from ember.net.errors import NetworkError
    from ember.net.manager import NetworkManager

    home = Home(tmp_path)
    (tmp_path / "net").mkdir()
    for junk in ("{not json", "[]", '{"machines": []}'):
        (tmp_path / "net" / "state.json").write_text(junk)
        with pytest.raises(NetworkError) as e:
            NetworkManager(home).machines()
        assert "delete the file" in str(e.value)


def _entry(**changes: Any) -> str:
    entry = {
        "machine_id": ID_A, "tap": tap_name(ID_A), "mac": "02:ee:ac:1e:00:02",
        "network": "default", "guest_ip": "172.30.0.2", "gateway": "172.30.0.1", "prefix": 30,
        "mtu": 1500, "nameservers": [], "slot": 0,
        "ports": [{"host_ip": None, "host_port": 8080, "guest_port": 80, "protocol": "tcp"}],
    }  # fmt: skip
    entry.update(changes)
    return json.dumps({"machines": {ID_A: entry}, "subnet": "172.30.0.0/16", "prefix": 30})


@pytest.mark.parametrize(
    "junk",
    [
        '{"machines": {"x": 5}}',
        '{"machines": {"x": {"tap": "em-x"}}}',
        _entry(slot="0"),
        _entry(machine_id=ID_B),
        _entry(ports=[{"host_port": "x", "guest_port": 80}]),
        _entry(ports=[{"host_port": 8080, "guest_port": 80, "protocol": "tcp dport 22 accept;"}]),
        _entry(ports=[{"host_port": 8080, "guest_port": 80, "host_ip": "1.2.3.4 tcp dport 22"}]),
        _entry(guest_ip='172.30.0.2:80 comment "x"\n\t\tip saddr 0.0.0.0/0 accept #'),
        "[" * 100_000,
        _entry(mac="02:ee:ac:1e:00:02,romfile=/etc/shadow"),
        _entry(netns={"dev": 4, "ino": 4026531840, "path": None, "cookie": "1"}),
    ],
    ids=["not-an-object", "no-keys", "slot", "id", "port", "protocol", "host-ip", "guest-ip",
         "deep", "mac", "netns-cookie"],
)  # fmt: skip
def test_a_damaged_machine_entry_is_reported_not_a_traceback(tmp_path: Path, junk: str) -> None:
    """Entries were not checked: a damaged one was a TypeError/KeyError/RecursionError in
    every later command, and its values went into the nftables script as they were."""
    from ember.home import Home
    from ember.net.errors import NetworkError
    from ember.net.manager import NetworkManager

    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "state.json").write_text(junk)
    with pytest.raises(NetworkError) as e:
        NetworkManager(Home(tmp_path)).machines()
    assert "delete the file" in str(e.value)


def test_a_sound_machine_entry_loads(tmp_path: Path) -> None:
    from ember.home import Home
    from ember.net.manager import NetworkManager

    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "state.json").write_text(_entry())
    (m,) = NetworkManager(Home(tmp_path)).machines().values()
    assert (m.guest_ip, str(m.ports[0])) == ("172.30.0.2", "8080->80/tcp")


HOLD_SCRIPT = """
from ember.net.manager import hold_host_ports
from ember.net.errors import PortConflict

def try_bind(kind, port, reuse):
    s = socket.socket(socket.AF_INET, kind)
    if reuse:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", port))
        if kind == socket.SOCK_STREAM:
            s.listen(1)
        return "bound"
    except OSError as e:
        return e.errno
    finally:
        s.close()

held = hold_host_ports(parse_publish("8080:80") + parse_publish("5353:53/udp"))
out["tcp"] = [try_bind(socket.SOCK_STREAM, 8080, r) for r in (False, True)]
out["udp"] = [try_bind(socket.SOCK_DGRAM, 5353, r) for r in (False, True)]
try:
    hold_host_ports(parse_publish("9090:90") + parse_publish("8080:80"))
except PortConflict as e:
    out["again"] = str(e)
out["9090 freed"] = try_bind(socket.SOCK_STREAM, 9090, False)
try:
    hold_host_ports(parse_publish("10.255.255.1:18080:80"))
except EmberError as e:
    out["elsewhere"] = str(e)
for s in held:
    s.close()
out["after"] = [try_bind(socket.SOCK_STREAM, 8080, False), try_bind(socket.SOCK_DGRAM, 5353, False)]
print(json.dumps(out))
"""


def test_held_host_ports_keep_host_programs_off_them(netns: str, tmp_path: Path) -> None:
    """Nothing held a published port: a host program could bind it after the machine
    started, and then never see a packet (the DNAT rule takes them first)."""
    import errno

    out = run_in_netns(netns, HOLD_SCRIPT, tmp_path)
    # with or without SO_REUSEADDR on the other side
    assert out["tcp"] == [errno.EADDRINUSE, errno.EADDRINUSE]
    assert out["udp"] == [errno.EADDRINUSE, errno.EADDRINUSE]
    assert "host port 8080/tcp was taken by a program on this host" in out["again"]
    assert out["9090 freed"] == "bound"  # what the failed hold took first, it let go
    assert out["elsewhere"] == "-p 10.255.255.1:18080->80/tcp: 10.255.255.1 is not an address of this host"
    assert out["after"] == ["bound", "bound"]


SETUP_HOLDING_SCRIPT = HOLD_SCRIPT.split("held = hold_host_ports")[0] + """
held = []
a = mgr.setup(sys.argv[2], ports=parse_publish("8080:80") + parse_publish("53/udp"), holder=held)
out["held"] = len(held)
out["tcp"] = try_bind(socket.SOCK_STREAM, 8080, True)
out["udp"] = try_bind(socket.SOCK_DGRAM, a.ports[1].host_port, False)
# a set-up refused (the port is another machine's) holds nothing
failed = []
try:
    mgr.setup(sys.argv[3], ports=parse_publish("9090:90") + parse_publish("8080:80"), holder=failed)
except EmberError as e:
    out["conflict"] = str(e)
out["failed"] = failed
out["9090"] = try_bind(socket.SOCK_STREAM, 9090, False)
# one that fails after holding (here: the TAP cannot be made) lets go and empties the list
from ember.net import tap
def no_tap(*args, **kwargs):
    raise OSError("no TAP today")
tap.create_tap, real_create_tap = no_tap, tap.create_tap
try:
    mgr.setup(sys.argv[3], ports=parse_publish("9191:91"), holder=failed)
except OSError as e:
    out["tap failed"] = str(e)
tap.create_tap = real_create_tap
out["failed after hold"] = failed
out["9191"] = try_bind(socket.SOCK_STREAM, 9191, False)
mgr.teardown(sys.argv[2])
out["still held after teardown"] = try_bind(socket.SOCK_STREAM, 8080, True)
for s in held:
    s.close()
out["after"] = try_bind(socket.SOCK_STREAM, 8080, False)
print(json.dumps(out))
"""


def test_setup_can_hold_the_ports_it_found_free(netns: str, tmp_path: Path) -> None:
    """A restart's monitor held the ports only after the set-up, ~100 ms later: a program
    binding one meanwhile made the restart fail as a start that never was."""
    import errno

    out = run_in_netns(netns, SETUP_HOLDING_SCRIPT, tmp_path)
    assert out["held"] == 2
    assert out["tcp"] == errno.EADDRINUSE and out["udp"] == errno.EADDRINUSE
    assert "8080/tcp is already published" in out["conflict"]
    assert out["failed"] == [] and out["9090"] == "bound"
    assert out["tap failed"] == "no TAP today"
    assert out["failed after hold"] == [] and out["9191"] == "bound"
    assert out["still held after teardown"] == errno.EADDRINUSE  # the caller's to close
    assert out["after"] == "bound"


# ---- teardown in the machine's own network namespace ----------------------------------

#: the helpers the namespace scripts share (after PRELUDE)
NS_HELPERS = """
def links():
    return sorted(l["ifname"] for l in json.loads(subprocess.run(
        ["ip", "-j", "link"], capture_output=True, text=True).stdout) if l["ifname"] != "lo")
def nft():
    r = subprocess.run(["nft", "list", "table", "inet", "ember"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None
def state():
    return sorted(json.loads((home.root / "net" / "state.json").read_text())["machines"])
"""


def run_script(prefix: list[str], script: str, state: Path) -> dict[str, Any]:
    """``PRELUDE + NS_HELPERS + script`` run under ``prefix`` (the command that puts it
    into a namespace); what it printed."""
    res = sh(*prefix, sys.executable, "-c", PRELUDE + NS_HELPERS + script + "\nprint(json.dumps(out))",
             str(state), ID_A, ID_B, ID_C, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def in_netns(name: str) -> list[str]:
    return ["ip", "netns", "exec", name]


def test_teardown_acts_in_the_namespace_the_network_was_set_up_in(
    make_netns: Any, tmp_path: Path
) -> None:
    """`ember rm` in another network namespace than its `ember run` deleted the TAP of
    the machine's name there (someone else's, or none) and left the machine's own, and
    its rules, where they were; and each namespace's table held every machine's rules."""
    a, b = make_netns(), make_netns()
    out = run_script(in_netns(a), """
out["a"] = mgr.setup(sys.argv[2], ports=parse_publish("8080:80")).to_json()
out["links"] = links()
""", tmp_path)  # fmt: skip
    assert out["a"]["netns"]["path"] == f"/run/netns/{a}"
    assert out["links"] == [tap_name(ID_A)]
    out = run_script(in_netns(b), f"""
mgr.setup(sys.argv[3])
out["nft"] = nft()
# a link of the other machine's TAP name in this namespace: not the machine's
subprocess.run(["ip", "tuntap", "add", "dev", "{tap_name(ID_A)}", "mode", "tap"], check=True)
mgr.teardown(sys.argv[2])
out["links"], out["nft_after"], out["state"] = links(), nft(), state()
mgr.teardown(sys.argv[2])  # idempotent, and still nothing touched here
out["links_again"] = links()
""", tmp_path)  # fmt: skip
    # this namespace's table holds its own machine's rules only
    assert tap_name(ID_B) in out["nft"] and tap_name(ID_A) not in out["nft"], out["nft"]
    assert "tcp . 8080" not in out["nft"]
    assert out["links"] == out["links_again"] == sorted([tap_name(ID_A), tap_name(ID_B)])
    assert tap_name(ID_B) in out["nft_after"]
    assert out["state"] == [ID_B]
    out = run_script(in_netns(a), 'out["links"], out["nft"] = links(), nft()', tmp_path)
    assert out == {"links": [], "nft": None}  # the machine's TAP and rules went there


def test_teardown_finds_an_unnamed_namespace_or_one_that_is_gone(
    make_netns: Any, tmp_path: Path
) -> None:
    """A namespace without an `ip netns` name is entered through a process in it; one
    that nothing holds any more took its TAP with it: only the allocation is left."""
    b, gone = make_netns(), make_netns()
    holder = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline  # (until unshare has made its namespace)
            time.sleep(0.01)
        unnamed = ["nsenter", f"--net=/proc/{holder.pid}/ns/net"]
        out = run_script(unnamed, 'out["c"] = mgr.setup(sys.argv[4]).to_json()', tmp_path)
        assert out["c"]["netns"]["path"] is None
        run_script(in_netns(gone), "mgr.setup(sys.argv[2])", tmp_path)
        sh("ip", "netns", "del", gone)  # nothing runs in it: the kernel frees it
        out = run_script(in_netns(b), f"""
subprocess.run(["ip", "tuntap", "add", "dev", "{tap_name(ID_A)}", "mode", "tap"], check=True)
mgr.teardown(sys.argv[4])
mgr.teardown(sys.argv[2])
out["links"], out["state"] = links(), state()
""", tmp_path)  # fmt: skip
        assert out == {"links": [tap_name(ID_A)], "state": []}
        out = run_script(unnamed, 'out["links"] = links()', tmp_path)
        assert out["links"] == []
    finally:
        holder.kill()
        holder.wait()


def _unshared_net() -> tuple[subprocess.Popen[bytes], int]:
    """A process in a network namespace of its own, made by `unshare -n` (no name),
    and that namespace's inode."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{proc.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
        assert time.monotonic() < deadline  # (until unshare has made its namespace)
        time.sleep(0.01)
    return proc, os.stat(f"/proc/{proc.pid}/ns/net").st_ino


def test_a_later_namespace_given_a_gone_ones_inode_is_not_taken_for_it(tmp_path: Path) -> None:
    """The kernel gives a freed namespace's inode to the next namespace made: the rules
    of a machine whose namespace was gone went into the new one's table (its published
    port DNAT'd there), and its teardown deleted a TAP of its name there."""
    first, ino = _unshared_net()
    holders = [first]
    try:
        enter = ["nsenter", f"--net=/proc/{first.pid}/ns/net"]
        run_script(enter, 'mgr.setup(sys.argv[2], ports=parse_publish("8080:80"))', tmp_path)
        first.kill()
        first.wait()  # nothing holds its namespace: the kernel frees it (soon after)
        for _ in range(100):
            again, again_ino = _unshared_net()
            holders.append(again)
            if again_ino == ino:
                break
            time.sleep(0.02)
        else:
            pytest.skip("this kernel did not hand the freed namespace's inode out again")
        out = run_script(["nsenter", f"--net=/proc/{again.pid}/ns/net"], f"""
mgr.setup(sys.argv[3])
out["nft"] = nft()
subprocess.run(["ip", "tuntap", "add", "dev", "{tap_name(ID_A)}", "mode", "tap"], check=True)
mgr.teardown(sys.argv[2])
out["links"], out["state"] = links(), state()
""", tmp_path)  # fmt: skip
        assert tap_name(ID_B) in out["nft"], out["nft"]
        assert tap_name(ID_A) not in out["nft"] and "8080" not in out["nft"], out["nft"]
        assert out["links"] == sorted([tap_name(ID_A), tap_name(ID_B)])
        assert out["state"] == [ID_B]
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()


TAP_OWNER_SCRIPT = r"""
import fcntl, os, struct
from ember.net import tap
tap.create_tap("em-owner0", "10.99.0.1", 30, route_localnet=False)
pid = os.fork()
if pid == 0:
    fd = os.open("/dev/net/tun", os.O_RDWR)  # (as if it were 0666, as on Debian)
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    try:
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"em-owner0", 0x0002 | 0x1000).ljust(40, b"\0"))
        os._exit(0)
    except PermissionError:
        os._exit(13)
_, status = os.waitpid(pid, 0)
print(json.dumps({"attach": os.waitstatus_to_exitcode(status)}))
"""


def test_a_machines_tap_is_roots_to_attach_to(netns: str, tmp_path: Path) -> None:
    """The persistent TAP had no owner: any uid that can open /dev/net/tun could attach
    to it while its QEMU was not (before it starts, after it ends)."""
    out = run_in_netns(netns, TAP_OWNER_SCRIPT, tmp_path)
    assert out["attach"] == 13  # EPERM


FLOWS_SCRIPT = r"""
def flows(addr):
    r = subprocess.run(["conntrack", "-L", "-f", "ipv4", "--reply-src", addr],
                       capture_output=True, text=True)
    return r.stdout.count("\n")
a = mgr.setup(sys.argv[2], ports=parse_publish("5353:53/udp"))
# another machine keeps the table (and its NAT hooks, whose removal drops NAT'd flows)
b = mgr.setup(sys.argv[3], ports=parse_publish("5354:53/udp"))
out["disable_ipv6"] = Path(f"/proc/sys/net/ipv6/conf/{a.tap}/disable_ipv6").read_text().strip()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
# DNAT'd to the machine: a tracked flow (from a host address that is not masqueraded,
# as a client on the network is not: a masqueraded one goes with the TAP)
s.sendto(b"q", (b.gateway, 5353))
out["before"] = flows(a.guest_ip)
mgr.teardown(sys.argv[2])
out["after"] = flows(a.guest_ip)
mgr.teardown(sys.argv[3])
print(json.dumps(out))
"""


def test_a_machines_tap_has_no_ipv6_and_its_flows_go_with_it(netns: str, tmp_path: Path) -> None:
    """Review findings: IPv6 on the TAP let a guest's router advertisement route the
    host; and a removed machine's tracked flows kept sending its published port's
    clients to its address, which the next machine (maybe another tenant's) gets."""
    out = run_in_netns(netns, FLOWS_SCRIPT, tmp_path)
    assert out["disable_ipv6"] == "1"
    assert out["before"] >= 1 and out["after"] == 0, out


EARLIER_BOOT_SCRIPT = r"""
def nft():
    r = subprocess.run(["nft", "list", "table", "inet", "ember"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""
mgr.setup(sys.argv[2], ports=parse_publish("8080:80"))
mgr.setup(sys.argv[3], ports=parse_publish("8081:80"))
# the host rebooted: both allocations are of an earlier boot
path = home.root / "net" / "state.json"
saved = json.loads(path.read_text())
for entry in saved["machines"].values():
    entry["boot_id"] = "an-earlier-boot"
path.write_text(json.dumps(saved))
out["before"] = mgr.allocated_before_this_boot()
mgr.teardown(sys.argv[2])  # one machine repaired (`ember inspect` of it, say)
out["after_one"] = [mgr.allocated_before_this_boot(), "tcp . 8081" in nft()]
c = mgr.setup(sys.argv[4], ports=parse_publish("9090:80"))  # a new machine of this boot
out["new"] = ["tcp . 9090" in nft(), "tcp . 8081" in nft()]
mgr.teardown(sys.argv[3]); mgr.teardown(sys.argv[4])
print(json.dumps(out))
"""


def test_allocations_of_an_earlier_boot_write_no_rules(netns: str, tmp_path: Path) -> None:
    """Review finding: after a reboot, the teardown of one dead machine rewrote the table
    with the other dead machines' DNAT rules, and the boot check then passed: their
    rules stayed, taking ports host programs may have taken since the boot."""
    out = run_in_netns(netns, EARLIER_BOOT_SCRIPT, tmp_path)
    assert out == {"before": True, "after_one": [True, False], "new": [True, False]}, out


TWO_HOMES = """
other = NetworkManager(Home(Path(sys.argv[1]) / "other"), NetConfig(nameservers=("192.0.2.53",)))
def nft():
    r = subprocess.run(["nft", "list", "table", "inet", "ember"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None
a = mgr.setup(sys.argv[2], ports=parse_publish("8080:80"))
try:
    other.setup(sys.argv[3], ports=parse_publish("8081:80"))
except EmberError as e:
    out["refused"] = str(e)
out["nft_kept"] = nft()
kept = home.root / "other" / "net" / "state.json"
out["other_state"] = json.loads(kept.read_text())["machines"] if kept.exists() else {}
# this home's machines gone without a teardown (a crash, its state directory deleted):
# the table is stale, and the other home takes it over
subprocess.run(["ip", "link", "delete", a.tap], check=True)
b = other.setup(sys.argv[3], ports=parse_publish("8081:80"))
out["nft_taken_over"] = nft()
mgr.teardown(sys.argv[2])  # the first home's late teardown leaves the other's rules alone
out["nft_after_late_teardown"] = nft()
other.teardown(sys.argv[3])
out["nft_end"] = nft()
print(json.dumps(out))
"""


def test_a_second_state_directory_in_the_namespace_is_refused(netns: str, tmp_path: Path) -> None:
    """Two state directories in one network namespace: the second replaced the first's
    rules (its published ports, the guard keeping guests off host-only addresses),
    gave its TAPs the same addresses, and deleted the table with its last machine."""
    out = run_in_netns(netns, TWO_HOMES, tmp_path)
    assert "another ember state directory runs machines in this network namespace" in out["refused"]
    assert "tcp . 8080 : 172.30.0.2 . 80" in out["nft_kept"] and "8081" not in out["nft_kept"]
    assert out["other_state"] == {}
    assert "8081" in out["nft_taken_over"] and "8080" not in out["nft_taken_over"]
    assert out["nft_after_late_teardown"] == out["nft_taken_over"]
    assert out["nft_end"] is None


RACER = """
import time
first = sys.argv[5] == "first"
if first:
    real = NetworkManager._refuse_another_homes_table
    def checked_then_slow(self, state):
        real(self, state)
        Path(sys.argv[6]).touch()  # checked: the table is free
        time.sleep(1.5)  # the other home checks meanwhile
    NetworkManager._refuse_another_homes_table = checked_then_slow
else:
    while not Path(sys.argv[6]).exists():
        time.sleep(0.01)
try:
    out["net"] = mgr.setup(sys.argv[2] if first else sys.argv[3]).to_json()
except EmberError as e:
    out["refused"] = str(e)
print(json.dumps(out))
"""


def test_two_state_directories_starting_at_once_are_not_both_let_in(
    netns: str, tmp_path: Path
) -> None:
    """Each home checked whose the namespace's table was under its own lock only: two
    first machines started at once both found it free, and both got 172.30.0.2."""
    import subprocess

    mark = tmp_path / "checked"
    procs = [
        subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", PRELUDE + RACER,
             str(tmp_path / role), ID_A, ID_B, ID_C, role, str(mark)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for role in ("first", "second")
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout))
    first, second = outs
    assert first["net"]["guest_ip"] == "172.30.0.2"
    assert "another ember state directory" in second.get("refused", ""), second
    sh("ip", "netns", "exec", netns, sys.executable, "-c",
       PRELUDE + "mgr.teardown(sys.argv[2]); print('{}')", str(tmp_path / "first"), ID_A)  # fmt: skip


def test_teardown_removes_the_rules_before_the_tap(netns: str, tmp_path: Path) -> None:
    """The TAP went first: for a moment the published port was still translated to an
    address no interface held."""
    out = run_in_netns(netns, """
import ember.net.manager as manager
a = mgr.setup(sys.argv[2], ports=parse_publish("8080:80"))
real = manager.tap.delete_link
def delete_link(name):
    r = subprocess.run(["nft", "list", "table", "inet", "ember"], capture_output=True, text=True)
    out["rule_when_tap_deleted"] = "172.30.0.2 . 80" in r.stdout
    real(name)
manager.tap.delete_link = delete_link
mgr.teardown(sys.argv[2])
print(json.dumps(out))
""", tmp_path)  # fmt: skip
    assert out["rule_when_tap_deleted"] is False
