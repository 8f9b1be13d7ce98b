"""``ember ps/logs/stop/kill/rm/inspect/port/wait``: machines, docker-style."""

from __future__ import annotations

import datetime as _dt
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from ember.cli.common import home_from_ctx, json_option, print_json
from ember.errors import EmberError


def _ago(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        t = _dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    s = int((_dt.datetime.now(_dt.UTC) - t).total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= size:
            n = s // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return f"{s} seconds ago"


def _status(st: Any) -> str:
    from ember.machines.state import EXITED, RUNNING

    if st.status == RUNNING:
        return f"Up {_ago(st.started_at).removesuffix(' ago')}"
    if st.status == EXITED:
        if st.restart_policy != "no" and not st.stopped_by_user:
            from ember.machines.lifecycle import monitor_alive

            if monitor_alive(st):  # between two runs of its --restart policy
                return f"Restarting ({st.exit_code}) {_ago(st.finished_at)}"
        return f"Exited ({st.exit_code}) {_ago(st.finished_at)}"
    return "Created"


def _ports(st: Any) -> str:
    if not st.network:
        return ""
    out = []
    for p in st.network.get("ports", []):
        host = p.get("host_ip") or "0.0.0.0"
        out.append(f"{host}:{p['host_port']}->{p['guest_port']}/{p['protocol']}")
    return ", ".join(out)


def _printable(text: str) -> str:
    """A value from an image (its Cmd) as one line of plain text: newlines and control
    characters escaped, as ``docker ps`` quotes its COMMAND column."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def find_machine(ref: str) -> Any:
    from ember.machines.lifecycle import refresh
    from ember.machines.store import MachineStore

    home = home_from_ctx()
    return refresh(home, MachineStore(home).find(ref))


@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show stopped machines too.")
@click.option("-q", "--quiet", is_flag=True, help="Only print machine ids.")
@json_option
def ps(show_all: bool, quiet: bool, as_json: bool) -> None:
    """List machines (running ones unless -a)."""
    from ember.machines.state import RUNNING
    from ember.machines.store import MachineStore

    home = home_from_ctx()
    machines, damaged = MachineStore(home).scan()
    if show_all:
        for broken in damaged:  # listed on stderr: stdout keeps its format
            click.echo(f"ember: {broken}", err=True)
    if any(m.status == RUNNING for m in machines):
        # refresh only changes a record that says running (its monitor may be gone);
        # without one, ps skips importing the lifecycle and VMM layers (~20 ms)
        from ember.machines.lifecycle import refresh

        machines = [refresh(home, m) for m in machines]
    if not show_all:
        machines = [m for m in machines if m.status == RUNNING]
    if as_json:
        print_json([m.to_json() for m in machines])
        return
    if quiet:
        for m in machines:
            click.echo(m.short_id)
        return
    header = ("MACHINE ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES")
    rows = []
    for m in machines:
        cmd = _printable(" ".join(m.command))
        cmd = cmd if len(cmd) <= 30 else cmd[:29] + "…"
        rows.append((m.short_id, _printable(m.image), f'"{cmd}"', _ago(m.created_at),
                     _status(m), _ports(m), m.name))  # fmt: skip
    # plain aligned columns (like docker ps): never wrapped, so scripts and narrow pipes
    # see one machine per line
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the machine ends.")
@click.argument("machine")
def logs(follow: bool, machine: str) -> None:
    """Print a machine's program output (stdout and stderr).

    The logs are capped (config.json's "logs" section): what is printed is what
    is kept, the rotated files oldest first, then the current ones."""
    from ember.machines.logs import LogFollower
    from ember.machines.state import RUNNING, read_state
    from ember.machines.store import MachineStore

    home = home_from_ctx()
    st = find_machine(machine)
    d = MachineStore(home).dir(st.id)
    with LogFollower.oldest(d / "stdout.log") as out, LogFollower.oldest(d / "stderr.log") as err:
        sinks = ((out, sys.stdout.buffer), (err, sys.stderr.buffer))
        while True:
            moved = False
            for src, dst in sinks:
                data = src.read(1 << 16)
                if data:
                    dst.write(data)
                    dst.flush()
                    moved = True
            if moved:
                continue
            if not follow:
                return
            try:
                if read_state(d).status != RUNNING:
                    follow = False  # one more pass drains what is left
            except FileNotFoundError:
                follow = False
            time.sleep(0.1)


def for_each(machines: tuple[str, ...], action: Callable[[str], object]) -> None:
    """Run ``action`` on each machine, like docker: report each failure, go on, fail at the end."""
    failed = False
    for ref in machines:
        try:
            action(ref)
            click.echo(ref)
        except EmberError as e:
            click.echo(f"ember: {e}", err=True)
            failed = True
    if failed:
        raise SystemExit(1)


stop_time_option = click.option(
    "-t", "--time", "timeout", type=click.IntRange(0, 3600), default=None,
    help="Seconds to wait for a graceful stop before killing (default: the machine's).",
)  # fmt: skip


def stop_gracefully(st: Any, timeout: int | None) -> Any:
    """``ember stop`` of one machine, ``-t`` or else the machine's own stop timeout."""
    from ember.machines import lifecycle

    t = timeout if timeout is not None else int(st.config.get("stop_timeout", 10))
    return lifecycle.stop(home_from_ctx(), st, t)


@click.command()
@stop_time_option
@click.argument("machines", nargs=-1, required=True)
def stop(timeout: int | None, machines: tuple[str, ...]) -> None:
    """Stop machines gracefully (StopSignal, then SIGKILL after the timeout)."""
    for_each(machines, lambda ref: stop_gracefully(find_machine(ref), timeout))


@click.command()
@click.argument("machines", nargs=-1, required=True)
def kill(machines: tuple[str, ...]) -> None:
    """Kill machines' programs at once (exit code 137)."""
    from ember.machines import lifecycle

    home = home_from_ctx()
    for_each(machines, lambda ref: lifecycle.kill(home, find_machine(ref)))


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill running machines first.")
@click.argument("machines", nargs=-1, required=True)
def rm(force: bool, machines: tuple[str, ...]) -> None:
    """Remove machines (root disk, network, logs)."""
    from ember.machines import lifecycle
    from ember.machines.errors import DamagedMachine

    home = home_from_ctx()

    def remove(ref: str) -> None:
        try:
            st = find_machine(ref)
        except DamagedMachine as e:
            if not force:
                raise
            lifecycle.remove_damaged(home, e.machine_id)
            return
        lifecycle.remove(home, st, force=force)

    for_each(machines, remove)


@click.command()
@click.argument("machines", nargs=-1, required=True)
def inspect(machines: tuple[str, ...]) -> None:
    """Print machines' full records as JSON."""
    from ember.machines.store import MachineStore

    home = home_from_ctx()
    out = []
    for ref in machines:
        st = find_machine(ref)
        data = st.to_json()
        data["dir"] = str(MachineStore(home).dir(st.id))
        out.append(data)
    print_json(out)


def port_lines(ports: list[dict[str, Any]], query: str | None) -> list[str]:
    """``ember port``'s lines, docker's format: ``80/tcp -> 0.0.0.0:8080`` for each
    mapping, or only ``0.0.0.0:8080`` for the mappings of ``query`` (``80``, ``53/udp``)."""
    from ember.net.ports import PROTOCOLS

    want: tuple[int, str] | None = None
    if query is not None:
        number, _, proto = query.partition("/")
        proto = proto.lower() or "tcp"
        valid = number.isascii() and number.isdigit() and 1 <= int(number[:6]) <= 65535
        if not valid or proto not in PROTOCOLS:
            raise click.BadParameter(
                f"{query!r}: expected PORT (1-65535) or PORT/tcp|udp", param_hint="PORT"
            )
        want = (int(number), proto)
    out = []
    for p in sorted(ports, key=lambda p: (p["protocol"], p["guest_port"], p["host_port"])):
        host = f"{p.get('host_ip') or '0.0.0.0'}:{p['host_port']}"
        if want is None:
            out.append(f"{p['guest_port']}/{p['protocol']} -> {host}")
        elif (p["guest_port"], p["protocol"]) == want:
            out.append(host)
    return out


@click.command()
@click.argument("machine")
@click.argument("port", required=False)
def port(machine: str, port: str | None) -> None:
    """Show a running machine's published ports (or where guest PORT[/PROTO] is published)."""
    from ember.machines.state import RUNNING

    st = find_machine(machine)
    ports = st.network.get("ports", []) if st.network and st.status == RUNNING else []
    lines = port_lines(ports, port)
    if port is not None and not lines:
        spec = port if "/" in port else f"{port}/tcp"
        raise EmberError(f"no public port {spec} is published for {st.name}")
    for line in lines:
        click.echo(line)


@click.command()
@click.argument("machines", nargs=-1, required=True)
def wait(machines: tuple[str, ...]) -> None:
    """Block until each machine has stopped, then print its exit code (one line each)."""
    from ember.machines.errors import MachineNotFound
    from ember.machines.state import EXITED

    for ref in machines:
        st = find_machine(ref)
        while st.status != EXITED:
            time.sleep(0.1)
            try:
                st = find_machine(st.id)  # refreshed: a machine whose monitor died is exited
            except MachineNotFound:
                raise EmberError(
                    f"machine {st.name} was removed (--rm) before its exit code could be read"
                ) from None
        click.echo(str(st.exit_code if st.exit_code is not None else 255))


commands: list[click.Command] = [ps, logs, stop, kill, rm, inspect, port, wait]
