"""Per-machine networking on the host: allocations persisted under a lock, TAPs, rules.

State: ``$EMBER_HOME/net/state.json`` (atomic writes), guarded by an flock on
``$EMBER_HOME/run/net.lock`` so concurrent ``ember run``s never hand out the
same addresses or ports.  Every change rebuilds the nftables table from that
state, so the rules always match what is allocated.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import secrets
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember import jsonutil
from ember.config import config_section
from ember.fsutil import atomic_write
from ember.home import Home
from ember.locks import FileLock
from ember.net import ipam, netfilter, netns, tap
from ember.net.errors import InvalidPortSpec, NetworkError, PortConflict
from ember.net.netns import Netns
from ember.net.nftables import (
    TABLE_FAMILY,
    TABLE_NAME,
    TAP_PREFIX,
    MachineRules,
    check_machine_id,
    check_network_name,
    check_rules,
    owner_in_listing,
    owner_of,
    render_ruleset,
)
from ember.net.ports import PortMapping, conflicts, ephemeral_range, pick_host_port
from ember.process import boot_id

_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")

#: Docker's fallback when the host has no usable (non-loopback) resolver
FALLBACK_NAMESERVERS = ("8.8.8.8", "8.8.4.4")
DEFAULT_MTU = 1500


@dataclass(frozen=True)
class NetConfig:
    subnet: str = ipam.DEFAULT_SUBNET
    prefix: int = ipam.DEFAULT_PREFIX
    egress: bool = True
    mtu: int = DEFAULT_MTU
    nameservers: tuple[str, ...] | None = None

    @classmethod
    def load(cls, home: Home) -> NetConfig:
        """The ``network`` object of ``$EMBER_HOME/config.json``, if any."""
        net = config_section(home, "network", NetworkError) or {}

        def typed(key: str, kind: type, default: Any) -> Any:
            value = net.get(key, default)
            # bool is an int to Python, and "false" a true value: both are mistakes here
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise NetworkError(
                    f"network.{key} in config.json must be {_KINDS[kind]}, not {value!r:.60}"
                )
            return value

        ns = typed("nameservers", list, None) if net.get("nameservers") is not None else None
        if ns is not None:
            for n in ns:
                try:
                    ipaddress.ip_address(n if isinstance(n, str) else "-")
                except ValueError:
                    raise NetworkError(
                        f"network.nameservers in config.json: {n!r:.60} is not an IP address"
                    ) from None
        mtu = typed("mtu", int, DEFAULT_MTU)
        if not 576 <= mtu <= 65535:
            raise NetworkError(f"network.mtu in config.json must be 576-65535, not {mtu}")
        prefix = typed("prefix", int, ipam.DEFAULT_PREFIX)
        # kept as its network prints (10.0.0.0/8): one written with a netmask
        # (10.0.0.0/255.0.0.0) passed here and then failed every setup's ruleset
        subnet = ipam.parse_subnet(typed("subnet", str, ipam.DEFAULT_SUBNET), prefix)
        return cls(
            subnet=str(subnet),
            prefix=prefix,
            egress=typed("egress", bool, True),
            mtu=mtu,
            nameservers=tuple(ns) if ns is not None else None,
        )


_KINDS = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}


@dataclass(frozen=True)
class MachineNetwork:
    machine_id: str
    tap: str
    mac: str
    network: str
    guest_ip: str
    gateway: str
    prefix: int
    mtu: int
    nameservers: tuple[str, ...] = ()
    ports: tuple[PortMapping, ...] = field(default_factory=tuple)
    #: the network namespace the TAP and rules are in (None: set up by an older ember)
    netns: Netns | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "machine_id": self.machine_id,
            "tap": self.tap,
            "mac": self.mac,
            "network": self.network,
            "guest_ip": self.guest_ip,
            "gateway": self.gateway,
            "prefix": self.prefix,
            "mtu": self.mtu,
            "nameservers": list(self.nameservers),
            "ports": [p.to_json() for p in self.ports],
            "netns": self.netns.to_json() if self.netns else None,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MachineNetwork:
        """ValueError when the MAC is not one (it goes into QEMU's arguments); the rest
        is checked by check_rules."""
        if not isinstance(d["mac"], str) or not _MAC_RE.fullmatch(d["mac"]):
            raise ValueError(f"invalid MAC address {d['mac']!r:.40}")
        return cls(
            machine_id=str(d["machine_id"]),
            tap=str(d["tap"]),
            mac=str(d["mac"]),
            network=str(d["network"]),
            guest_ip=str(d["guest_ip"]),
            gateway=str(d["gateway"]),
            prefix=int(d["prefix"]),
            mtu=int(d["mtu"]),
            nameservers=tuple(d.get("nameservers", ())),
            ports=tuple(PortMapping.from_json(p) for p in d.get("ports", ())),
            netns=Netns.from_json(d["netns"]) if d.get("netns") is not None else None,
        )


def _this_boot(entry: dict[str, Any]) -> bool:
    """Whether an allocation entry was made since the host last booted (an older
    ember's entry names no boot: taken as this one's, as before)."""
    made = entry.get("boot_id")
    return made is None or made == boot_id()


def tap_name(machine_id: str) -> str:
    """``em-<first 12 hex of the id>``: 15 characters, the kernel's IFNAMSIZ limit."""
    return TAP_PREFIX + check_machine_id(machine_id)[:12]


def host_nameservers(resolv_conf: str) -> tuple[str, ...]:
    """Nameservers of a resolv.conf a guest can use (loopback resolvers are the host's own)."""
    out = []
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(fields[1].split("%")[0])
            except ValueError:
                continue
            if addr.version == 4 and not addr.is_loopback:
                out.append(str(addr))
    return tuple(out)


# teardown works from a machine's id alone, so a fresh file loses nothing a later
# `ember rm` needs; what it would lose is which addresses running machines hold
_STATE_HINT = "with no machine running, delete the file: ember makes a new one"


#: one lock per network namespace (its nsfs identity), shared by every state directory
NETNS_LOCKS = Path("/run/ember")


class NetworkManager:
    def __init__(self, home: Home, config: NetConfig | None = None) -> None:
        self.home = home
        self.config = config or NetConfig.load(home)
        self.state_path = home.net_state
        self.lock_path = home.net_lock
        #: the nftables table's comment while it holds this home's machines' rules
        self.owner = owner_of(os.path.realpath(home.root))

    # ---- persisted state ------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self.lock_path):
            yield self._load()

    def _load(self) -> dict[str, Any]:
        try:
            state = jsonutil.loads(self.state_path.read_text())
        except FileNotFoundError:
            state = {}
        except (OSError, ValueError) as e:  # jsonutil: too deep a nesting is a ValueError
            raise NetworkError(
                f"network state {self.state_path} is unreadable: {e}", hint=_STATE_HINT
            ) from e
        if not isinstance(state, dict) or not isinstance(state.get("machines", {}), dict):
            raise NetworkError(f"network state {self.state_path} is malformed", hint=_STATE_HINT)
        state.setdefault("machines", {})
        if not state["machines"]:
            # the configured subnet applies whenever nothing is allocated from the old one
            state["subnet"], state["prefix"] = self.config.subnet, self.config.prefix
        state.setdefault("subnet", self.config.subnet)
        state.setdefault("prefix", self.config.prefix)
        for key, entry in state["machines"].items():
            try:
                m = MachineNetwork.from_json(entry)
                if m.machine_id != key or type(entry["slot"]) is not int:
                    raise ValueError("not the entry of its machine")
                check_rules(MachineRules(m.machine_id, m.tap, m.guest_ip, m.network, m.ports))
            except (KeyError, TypeError, ValueError, NetworkError) as e:
                raise NetworkError(
                    f"network state {self.state_path} is malformed"
                    f" (machine {key[:12]!r}: {e!s:.80})",
                    hint=_STATE_HINT,
                ) from None
        return state

    def _save(self, state: dict[str, Any]) -> None:
        atomic_write(self.state_path, json.dumps(state, indent=1, sort_keys=True).encode(), 0o600)

    def allocated_before_this_boot(self) -> bool:
        """Whether some allocation was made before the host last booted (its entry names
        another boot): its TAP is gone, and the allocation waits for its machine's
        repair; its rules are no longer written (``_ruleset``)."""
        with self._locked() as state:
            return any(not _this_boot(e) for e in state["machines"].values())

    def machines(self) -> dict[str, MachineNetwork]:
        with self._locked() as state:
            return {k: MachineNetwork.from_json(v) for k, v in state["machines"].items()}

    # ---- rules --------------------------------------------------------------------

    def _ruleset(self, state: dict[str, Any], where: Netns | None) -> str:
        """The nftables script for namespace ``where``: the rules of the machines whose
        network is in it (and of those set up by an older ember, which recorded none)."""
        rules = [
            MachineRules(m.machine_id, m.tap, m.guest_ip, m.network, m.ports, m.nameservers)
            for m in (
                # an allocation of an earlier boot: its machine is dead and its TAP gone;
                # its DNAT rules would take ports host programs may have taken since
                MachineNetwork.from_json(v) for v in state["machines"].values() if _this_boot(v)
            )
            if m.netns is None or where is None or m.netns.same(where)
        ]
        return render_ruleset(
            rules, subnet=state["subnet"], egress=self.config.egress, owner=self.owner
        )

    def _table_owner(self) -> str | None:
        """Whose rules table ``inet ember`` here holds: this home's (``self.owner``), no
        one's (None: no table, or an older ember's without a comment), or another
        state directory's."""
        listing = netfilter.table_listing(TABLE_FAMILY, TABLE_NAME)
        return None if listing is None else owner_in_listing(listing)

    @contextmanager
    def _namespace_locked(self, where: Netns) -> Iterator[None]:
        """Held over reading whose the namespace's table is and writing it: two homes
        each hold their own lock only, and two first machines started at once both
        found the table free, and both got the same addresses."""
        NETNS_LOCKS.mkdir(mode=0o755, parents=True, exist_ok=True)
        # removed on release: one file per namespace ever used would pile up (the
        # lock re-checks the inode it took, so a waiter never holds a deleted one)
        path = NETNS_LOCKS / f"netns-{where.dev}-{where.ino}.lock"
        with FileLock(path, unlink_on_release=True):
            yield

    def _refuse_another_homes_table(self, state: dict[str, Any]) -> None:
        """Two state directories in one network namespace share the table's name and the
        default subnet: the second replaced the first's rules (its published ports and
        its guard against guests reaching host-only addresses), gave its TAPs the same
        addresses, and deleted the table with its last machine.  While another home's
        machines are here, refuse; a table whose machines are all gone (that home
        crashed or was deleted) is replaced."""
        if self._table_owner() == self.owner:
            return
        # (no table, or an older ember's without a comment: another home's machines may
        # still be here, their table removed by a `flush ruleset`; their TAPs tell)
        ours = {v["tap"] for v in state["machines"].values()}
        theirs = sorted(
            name for _, name in socket.if_nameindex()
            if name.startswith(TAP_PREFIX) and name not in ours
        )  # fmt: skip
        if theirs:
            raise NetworkError(
                "another ember state directory runs machines in this network namespace "
                f"(nftables table {TABLE_FAMILY} {TABLE_NAME} and {', '.join(theirs[:3])}"
                f"{' ...' if len(theirs) > 3 else ''} are its): one state directory per "
                "network namespace",
                hint="run this one's machines in a network namespace of their own (ip netns "
                "exec), or stop the other's; if that state directory is gone, delete its "
                f"interfaces (ip link delete {theirs[0]}) (docs/networking.md)",
            )

    def nameservers(self) -> tuple[str, ...]:
        if self.config.nameservers is not None:
            return self.config.nameservers
        try:
            found = host_nameservers(Path("/etc/resolv.conf").read_text())
        except OSError:
            found = ()
        return found or FALLBACK_NAMESERVERS

    # ---- machines -----------------------------------------------------------------

    def setup(
        self,
        machine_id: str,
        *,
        ports: Sequence[PortMapping] = (),
        network: str = "default",
        holder: list[socket.socket] | None = None,
    ) -> MachineNetwork:
        """Allocate addresses, create the TAP and publish ports for one machine.

        ``holder``: the published host ports are held (``hold_host_ports``) from the
        moment they are found free, the sockets put in ``holder`` for the caller to keep
        while the machine runs and close after.  The monitor starting a machine again
        does this: holding them later left a moment when a program could take one, and
        the restart failed as a start that never was (its last exit code lost).  They
        are closed again (and ``holder`` emptied) when the set-up fails."""
        try:
            return self._setup(machine_id, ports, network, holder)
        except BaseException:
            for held in holder or ():
                held.close()
            if holder:
                holder.clear()
            raise

    def _setup(
        self,
        machine_id: str,
        ports: Sequence[PortMapping],
        network: str,
        holder: list[socket.socket] | None,
    ) -> MachineNetwork:
        check_network_name(network)
        name = tap_name(machine_id)
        with self._locked() as state:
            if machine_id in state["machines"]:
                raise NetworkError(f"machine {machine_id[:12]} already has a network")
            with self._namespace_locked(netns.here()):
                return self._setup_locked(state, machine_id, name, ports, network, holder)

    def _setup_locked(
        self,
        state: dict[str, Any],
        machine_id: str,
        name: str,
        ports: Sequence[PortMapping],
        network: str,
        holder: list[socket.socket] | None,
    ) -> MachineNetwork:
        """``_setup`` under the home's lock and the namespace's."""
        self._refuse_another_homes_table(state)
        taken: list[PortMapping] = []
        fixed = [m for m in ports if m.chosen and not m.auto]
        for other in state["machines"].values():
            for theirs in MachineNetwork.from_json(other).ports:
                taken.append(theirs)
                for mine in fixed:
                    if conflicts(mine, theirs):
                        raise PortConflict(
                            f"host port {mine.host_port}/{mine.protocol} is already "
                            f"published by machine {other['machine_id'][:12]}"
                        )
        for i, first in enumerate(fixed):
            for second in fixed[i + 1 :]:
                if conflicts(first, second):
                    raise PortConflict(
                        f"host port {first.host_port}/{first.protocol} given twice"
                    )
        for m in fixed:
            # The DNAT rule would take this port's traffic away from a program
            # of the host that serves it: refuse, as Docker does.
            if not _bindable(m, ignore_time_wait=True):
                where = f"{m.host_ip}:{m.host_port}" if m.host_ip else str(m.host_port)
                raise PortConflict(
                    f"host port {where}/{m.protocol} is in use by a program on this host",
                    hint="stop that program, or publish another host port",
                )
        ports = _choose_host_ports(ports, [*taken, *fixed])
        if holder is not None:
            holder.extend(hold_host_ports(ports))
        subnet = ipam.parse_subnet(state["subnet"], state["prefix"])
        _refuse_overlapping_routes(subnet)
        used = {int(m["slot"]) for m in state["machines"].values()}
        slot = ipam.first_free(subnet, state["prefix"], used)
        b = ipam.block(subnet, state["prefix"], slot)
        net = MachineNetwork(
            machine_id=machine_id,
            tap=name,
            mac=ipam.mac_for(b.guest),
            network=network,
            guest_ip=str(b.guest),
            gateway=str(b.gateway),
            prefix=b.prefix,
            mtu=self.config.mtu,
            nameservers=self.nameservers(),
            ports=tuple(ports),
            # where the TAP and the rules go: teardown acts there, from anywhere
            netns=netns.current(),
        )
        # record first: a crash from here on leaves an allocation teardown can undo
        state["machines"][machine_id] = {**net.to_json(), "slot": slot, "boot_id": boot_id()}
        self._save(state)
        try:
            tap.delete_link(name)  # a leftover of a crashed earlier machine
            tap.create_tap(
                name, net.gateway, net.prefix, route_localnet=bool(ports), mtu=net.mtu
            )
            if self.config.egress or ports:
                # host-wide: replies from the outside, and published ports' clients,
                # come in on the host's other interfaces
                tap.enable_forwarding()
            netfilter.apply(self._ruleset(state, net.netns))
        except BaseException:
            # the link goes before the record: no moment a TAP exists unrecorded
            tap.delete_link(name)
            del state["machines"][machine_id]
            self._save(state)
            netfilter.apply(self._ruleset(state, net.netns))
            raise
        return net

    def teardown(self, machine_id: str) -> None:
        """Remove the machine's TAP, rules and allocation (idempotent), in the network
        namespace they were set up in, whichever namespace this runs in.

        Nothing but the allocation is left to free when that namespace is gone (nothing
        reaches it: its TAP went with it).  A machine with no allocation has nothing
        to free: a link of its TAP's name here is left alone, as it may be another
        namespace's machine's, or no machine's."""
        with self._locked() as state:
            entry = state["machines"].get(machine_id)
            if entry is None:
                return
            m = MachineNetwork.from_json(entry)
            del state["machines"][machine_id]
            rules = self._ruleset(state, m.netns)  # what stays in its namespace

            def release() -> None:
                with self._namespace_locked(netns.here()):
                    if self._table_owner() in (None, self.owner):
                        # (else another home's rules since: this one's were replaced when
                        # found stale, and neither they nor its flows are ours)
                        netfilter.apply(rules)
                        # after the rules: no new translation to the address can begin
                        netfilter.forget_flows(m.guest_ip)
                # the TAP last: until the rules are gone, traffic they translate to the
                # address still has its interface (none goes to an address nothing holds)
                tap.delete_link(m.tap)

            if m.netns is None or m.netns.same(netns.here()):
                release()  # (an older ember's entry: where the command runs, as before)
            else:
                netns.run_in(m.netns, release)  # False: gone, and its TAP with it
            # only once it is gone: a failure above leaves the entry for another try
            self._save(state)


def _refuse_overlapping_routes(subnet: ipaddress.IPv4Network) -> None:
    """NetworkError when the host routes part of the machine subnet elsewhere (in this
    thread's network namespace): its machines would shadow that network."""
    try:
        table = Path("/proc/thread-self/net/route").read_text()
    except OSError:
        return  # no /proc (or no IPv4): nothing known to clash with
    clashes = ipam.overlapping_routes(subnet, table, own_prefix=TAP_PREFIX)
    if clashes:
        iface, network = clashes[0]
        raise NetworkError(
            f"the machine subnet {subnet} overlaps this host's network {network} (on {iface}): "
            "machines would hide it from the host, and could not reach it",
            hint="set another network.subnet in config.json (docs/networking.md)",
        )


# ---- host ports left to choose (`-p 80`, `-p 8000-8010:80`) --------------------------------


def _choose_host_ports(
    ports: Sequence[PortMapping], taken: Sequence[PortMapping]
) -> tuple[PortMapping, ...]:
    """``ports`` with every host port left open chosen: not published by a machine, not
    bound by a program on the host.  From the host's ephemeral range at a random place
    in it, as the kernel picks its own (a port one machine just freed is not handed to
    the next at once); from a range the user gave, its first free port, as Docker does.
    A port ember chose for an earlier run of the machine is kept while it is free."""
    if all(m.chosen and not m.auto for m in ports):
        return tuple(ports)
    try:
        ephemeral = ephemeral_range(Path(_EPHEMERAL_RANGE).read_text())
    except OSError:
        ephemeral = ephemeral_range("")
    out: list[PortMapping] = []
    for m in ports:
        start = 0 if m.host_range is not None else secrets.randbelow(len(ephemeral))
        got = pick_host_port(m, [*taken, *out], ephemeral, _bindable, start=start)
        if got is None:
            where = "the host's ephemeral range" if m.host_range is None else "its range"
            raise PortConflict(f"no host port of {where} is free for {m}")
        out.append(got)
    return tuple(out)


_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def _bindable(m: PortMapping, *, ignore_time_wait: bool = False) -> bool:
    """Whether a program on the host could bind ``m``'s host port now (none holds it).

    ``ignore_time_wait``: a TCP port whose only sockets are closed connections
    waiting out TIME_WAIT counts as free (SO_REUSEADDR on the probe; a listener
    still makes it fail).  Without it such a port counts as taken, which suits
    choosing a port: one a connection just used is not handed out.
    """
    try:
        _bound(m, reuse=ignore_time_wait, listen=False).close()
    except OSError:
        return False
    return True


def _bound(m: PortMapping, *, reuse: bool, listen: bool) -> socket.socket:
    """A socket bound to ``m``'s host port (SO_REUSEADDR and listening, for TCP, when
    asked); InvalidPortSpec when its address is not the host's, else OSError."""
    tcp = m.protocol == "tcp"
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        if reuse and tcp:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((m.host_ip or "0.0.0.0", m.host_port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise InvalidPortSpec(f"-p {m}: {m.host_ip} is not an address of this host") from None
            raise
        if listen and tcp:
            s.listen(1)
    except BaseException:
        s.close()
        raise
    return s


# ---- holding published ports ---------------------------------------------------------------


def hold_host_ports(ports: Iterable[PortMapping]) -> list[socket.socket]:
    """A socket on each published host port, for the machine's monitor to keep while the
    machine runs, as Docker keeps one: a host program that binds the port later fails
    (EADDRINUSE) instead of starting fine and never seeing a packet, which the DNAT rule
    takes first; and ``ss -ltnp`` names who has the port.

    A TCP socket listens (a listener conflicts with every bind, whatever SO_REUSEADDR
    the other side sets) with SO_REUSEADDR so that closed connections in TIME_WAIT do
    not keep the machine from starting; it never accepts, and nothing reaches it while
    the rule is in place.  A UDP socket is bound without SO_REUSEADDR (so no other
    socket can share the port).  PortConflict when a port was taken since ``setup``
    checked it, another NetworkError when it cannot be held; the sockets held so far
    are closed then."""
    held: list[socket.socket] = []
    try:
        for m in ports:
            try:
                held.append(_bound(m, reuse=True, listen=True))
            except OSError as e:
                where = f"{m.host_ip}:{m.host_port}" if m.host_ip else str(m.host_port)
                if e.errno == errno.EADDRINUSE:
                    raise PortConflict(
                        f"host port {where}/{m.protocol} was taken by a program on this host",
                        hint="stop that program, or publish another host port",
                    ) from None
                raise NetworkError(
                    f"cannot hold host port {where}/{m.protocol}: {e.strerror or e}"
                ) from None
    except BaseException:
        for s in held:
            s.close()
        raise
    return held
