from __future__ import annotations

import subprocess

import pytest

from ember.net.errors import NetworkError
from ember.net.nftables import MachineRules, render_ruleset
from ember.net.ports import PortMapping

A = MachineRules(
    "aaaaaaaaaaaa0000",
    "em-aaaaaaaaaaaa",
    "172.30.0.2",
    ports=(PortMapping(8080, 80), PortMapping(5353, 53, "udp", "127.0.0.1")),
)
B = MachineRules("bbbbbbbbbbbb0000", "em-bbbbbbbbbbbb", "172.30.0.6", network="tenant_b")


def test_empty_ruleset_just_deletes_the_table() -> None:
    script = render_ruleset([], subnet="172.30.0.0/16", egress=True)
    assert script == "table inet ember\ndelete table inet ember\n"


def test_ruleset_contents() -> None:
    script = render_ruleset([A, B], subnet="172.30.0.0/16", egress=True)
    lines = [line.strip() for line in script.splitlines()]
    assert lines[:3] == ["table inet ember", "delete table inet ember", "table inet ember {"]
    assert 'elements = { "em-aaaaaaaaaaaa" }' in lines
    assert 'elements = { "em-bbbbbbbbbbbb" }' in lines
    assert "iifname @nw_default oifname @nw_default accept" in lines
    assert "iifname @nw_tenant_b oifname @nw_tenant_b accept" in lines
    assert lines.index('iifname "em-*" oifname "em-*" drop') > lines.index(
        "iifname @nw_tenant_b oifname @nw_tenant_b accept"
    )
    # one map lookup per new connection, however many ports (a rule a port made every
    # new connection of the host walk them all)
    assert "elements = { tcp . 8080 : 172.30.0.2 . 80 }" in lines
    assert "elements = { 127.0.0.1 . udp . 5353 : 172.30.0.2 . 53 }" in lines
    lookups = [
        "meta nfproto ipv4 fib daddr type local dnat ip to meta l4proto . th dport map @published",
        "meta nfproto ipv4 fib daddr type local dnat ip to ip daddr . meta l4proto . th dport "
        "map @published_at",
    ]
    assert [lines.count(rule) for rule in lookups] == [2, 2]  # prerouting and output
    assert sum("dnat" in line and "ct status" not in line for line in lines) == 4
    assert 'ip saddr 172.30.0.0/16 oifname != "em-*" masquerade' in lines
    guard = lines[lines.index("chain guard {"):]
    assert guard[1] == "type filter hook prerouting priority raw; policy accept;"
    assert 'iifname "em-*" ip daddr { 127.0.0.0/8, 169.254.0.0/16 } drop' in guard
    assert 'iifname "em-*" meta nfproto ipv6 drop' in guard
    assert 'iifname "em-*" drop' not in lines  # egress on: what leaves is masqueraded
    assert 'iifname "em-*" iifname . ip saddr != @sources drop' in guard
    assert 'elements = { "em-aaaaaaaaaaaa" . 172.30.0.2, "em-bbbbbbbbbbbb" . 172.30.0.6 }' in lines


def test_no_egress_no_masquerade_and_nothing_forwarded_out() -> None:
    script = render_ruleset([A], subnet="172.30.0.0/16", egress=False)
    assert "oifname != " not in script
    lines = [line.strip() for line in script.splitlines()]
    forward = lines[lines.index("chain forward {"):]
    forward = forward[: forward.index("}")]
    # last: replies and published ports pass before it
    assert forward[-1] == 'iifname "em-*" drop'


@pytest.mark.parametrize(
    "bad",
    [
        MachineRules("x", "eth0", "172.30.0.2"),
        MachineRules("x", 'em-a"; flush ruleset', "172.30.0.2"),
        MachineRules("x", "em-aaaa", "172.30.0.2", network="Bad-Name"),
        MachineRules("x", "em-aaaa\n", "172.30.0.2"),
        MachineRules("x", "em-aaaa", "172.30.0.2", network="tenant\n"),
    ],
)
def test_hostile_names_are_refused(bad: MachineRules) -> None:
    with pytest.raises(NetworkError):
        render_ruleset([bad], subnet="172.30.0.0/16", egress=True)


INJECTED = "22 accept\n\t}\n\tchain x {"


@pytest.mark.parametrize(
    "bad",
    [
        MachineRules('aaaaaaaaaaaa"\n', "em-aaaaaaaaaaaa", "172.30.0.2", ports=A.ports),
        MachineRules(A.machine_id, A.tap, f"172.30.0.2:{INJECTED}", ports=A.ports),
        MachineRules(A.machine_id, A.tap, "172.30.0.2", ports=(PortMapping(1, 80, INJECTED),)),
        MachineRules(
            A.machine_id, A.tap, "172.30.0.2", ports=(PortMapping(1, 80, "tcp", INJECTED),)
        ),
        MachineRules(A.machine_id, A.tap, "172.30.0.2", ports=(PortMapping(0, 80),)),
        MachineRules(A.machine_id, A.tap, "172.30.0.2", ports=(PortMapping(1, 65536),)),
    ],
    ids=["machine-id", "guest-ip", "protocol", "host-ip", "port-0", "port-65536"],
)
def test_hostile_values_cannot_add_rules(bad: MachineRules) -> None:
    """Only the TAP and network names were checked: a port, an address or an id (from a
    damaged state file or machine record) went into the script as it was."""
    with pytest.raises(NetworkError):
        render_ruleset([bad], subnet="172.30.0.0/16", egress=True)


def test_a_hostile_subnet_cannot_add_rules() -> None:
    with pytest.raises(NetworkError):
        render_ruleset([A], subnet=f"172.30.0.0/16 {INJECTED}", egress=True)


@pytest.mark.root
def test_nft_accepts_the_ruleset(netns: str) -> None:
    script = render_ruleset([A, B], subnet="172.30.0.0/16", egress=True)
    res = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-c", "-f", "-"],
        input=script, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_nameservers_of_any_family_and_only_link_local_ipv4_ones_opened() -> None:
    """An IPv6 nameserver in config.json made every ruleset fail (the review of the
    link-local DNS exception): any address is accepted, only IPv4 link-local ones get
    the exception, and what is no address is refused (it would go into the script)."""
    m = MachineRules("a" * 12, "em-aaaaaaaaaaaa", "172.30.0.2",
                     nameservers=("2606:4700:4700::1111", "1.1.1.1", "169.254.169.254"))  # fmt: skip
    script = render_ruleset([m], subnet="172.30.0.0/16", egress=True)
    accepts = [line.strip() for line in script.splitlines() if "dport 53 accept" in line]
    assert accepts == [
        'iifname "em-*" ip daddr { 169.254.169.254 } meta l4proto { tcp, udp } th dport 53 accept'
    ]
    bad = MachineRules("a" * 12, "em-aaaaaaaaaaaa", "172.30.0.2", nameservers=("1.1.1.1; x",))
    with pytest.raises(NetworkError):
        render_ruleset([bad], subnet="172.30.0.0/16", egress=True)


def test_the_table_names_the_state_directory_it_belongs_to() -> None:
    from ember.net.nftables import owner_in_listing, owner_of

    owner = owner_of("/var/lib/ember")
    assert owner.startswith("ember home ") and owner != owner_of("/var/lib/ember2")
    script = render_ruleset([A], subnet="172.30.0.0/16", egress=True, owner=owner)
    assert f'table inet ember {{\n\tcomment "{owner}"\n' in script
    # nft prints it back the same way (checked against nft 1.0.6 in test_manager)
    assert owner_in_listing(f'table inet ember {{\n\tcomment "{owner}"\n\tset nw_default {{') == owner
    assert owner_in_listing("table inet ember {\n\tset nw_default {") is None
    with pytest.raises(NetworkError):
        render_ruleset([A], subnet="172.30.0.0/16", egress=True, owner='x" ; flush ruleset')


def test_dockers_name_for_the_default_network_is_embers_default() -> None:
    from ember.net.nftables import check_requested_network

    assert check_requested_network("bridge") == "default"
    assert check_requested_network("tenant_b") == "tenant_b"
