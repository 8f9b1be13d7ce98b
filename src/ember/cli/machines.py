"""``ember ps/logs/stop/kill/rm/inspect/port/wait``: machines, docker-style."""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from ember.cli.common import (
    WholeNumber,
    ago,
    format_option,
    go_time,
    home_from_ctx,
    json_option,
    print_json,
    printable,
    say,
    say_error,
    since,
    warnings_as_messages,
)
from ember.errors import EmberError, UsageError
from ember.home import Home
from ember.machines.controllines import NO_STOP_TIMEOUT

if TYPE_CHECKING:
    from ember.cli.goformat import Schema
    from ember.machines.state import MachineState


def _restarting(st: MachineState) -> bool:
    """Between two runs of its --restart policy (``lifecycle.restart_pending``)."""
    if not st.between_restarts:
        return False  # the common cases, without importing the lifecycle (~20 ms)
    from ember.machines.lifecycle import restart_pending

    return restart_pending(st)


def _paused(st: MachineState) -> bool:
    """Whether its current run is paused (``ember pause``)."""
    from ember.machines.pause import is_paused
    from ember.machines.state import RUNNING
    from ember.machines.store import MachineStore

    if st.status != RUNNING or st.vmm_pid is None:
        return False  # (without looking for the state directory)
    return is_paused(MachineStore(home_from_ctx()).dir(st.id), st)


def _record(st: MachineState) -> dict[str, Any]:
    """A machine's record as ``inspect`` and ``ps --json`` print it: ``status`` is
    ``restarting`` between two runs of its restart policy and ``paused`` while paused,
    as docker's State.Status."""
    data: dict[str, Any] = st.to_json()
    if _restarting(st):
        data["status"] = "restarting"
    elif _paused(st):
        data["status"] = "paused"
    return data


def _status(st: MachineState) -> str:
    from ember.machines.state import EXITED, RUNNING

    if st.status == RUNNING:
        up = f"Up {since(st.started_at) or ''}".rstrip()
        return f"{up} (Paused)" if _paused(st) else up
    if st.status == EXITED:
        if _restarting(st):
            return f"Restarting ({st.exit_code}) {ago(st.finished_at)}"
        return f"Exited ({st.exit_code}) {ago(st.finished_at)}"
    if _restarting(st):
        return "Restarting"  # (being started again: the last run's exit is cleared)
    return "Created"


def _ports(st: MachineState) -> str:
    """Published ports of a running machine (docker shows none for a stopped one)."""
    from ember.machines.state import RUNNING

    if not st.network or st.status != RUNNING:
        return ""
    # consecutive mappings (-p 9000-9002:9000-9002) fold into one range, as docker's
    runs: list[list[Any]] = []  # [host ip, protocol, first host, first guest, length]
    for p in st.network.get("ports", []):
        host, proto = p.get("host_ip") or "0.0.0.0", p["protocol"]
        last = runs[-1] if runs else None
        if (last is not None and last[:2] == [host, proto]
                and p["host_port"] == last[2] + last[4] and p["guest_port"] == last[3] + last[4]):  # fmt: skip
            last[4] += 1
        else:
            runs.append([host, proto, p["host_port"], p["guest_port"], 1])

    def span(first: int, n: int) -> str:
        return str(first) if n == 1 else f"{first}-{first + n - 1}"

    return ", ".join(f"{h}:{span(hp, n)}->{span(gp, n)}/{proto}" for h, proto, hp, gp, n in runs)


def _command(st: MachineState, no_trunc: bool) -> str:
    """The COMMAND column (and ``.Command``): cut to 30 characters unless ``no_trunc``,
    then quoted as docker quotes it (Go's strconv.Quote: ``\\`` and ``\"`` inside, control
    characters escaped), so the text between the quotes reads back as the command."""
    cmd = " ".join(st.command)
    if not no_trunc and len(cmd) > 30:
        cmd = cmd[:29] + "…"
    return '"' + printable(cmd.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _state(st: MachineState) -> str:
    """docker's ``.State``: created, running, paused, restarting or exited."""
    if _restarting(st):
        return "restarting"
    return "paused" if _paused(st) else st.status


#: docker ps's template fields ember has: each one's value of a machine, given --no-trunc
_PS_FIELDS: dict[str, Callable[[MachineState, bool], str]] = {
    "ID": lambda st, full: st.id if full else st.short_id,
    "Image": lambda st, _: st.image,
    "Command": _command,
    "CreatedAt": lambda st, _: go_time(st.created_at),
    "RunningFor": lambda st, _: ago(st.created_at),
    "Ports": lambda st, _: _ports(st),
    "State": lambda st, _: _state(st),
    "Status": lambda st, _: _status(st),
    "Names": lambda st, _: st.name,
    # sorted, as docker's (a label map has no order of its own)
    "Labels": lambda st, _: ",".join(sorted(f"{k}={v}" for k, v in st.labels.items())),
    "Networks": lambda st, _: str((st.network or {}).get("network") or ""),
    # docker's: the volumes' names (ember has no bind mounts); .LocalVolumes: their count
    "Mounts": lambda st, _: ",".join(v.split(":", 1)[0] for v in st.vm.volumes),
    "LocalVolumes": lambda st, _: str(len(st.vm.volumes)),
}


def _ps_schema() -> Schema:
    from ember.cli.goformat import Schema

    headers = {
        # MACHINE ID, not docker's CONTAINER ID: `--format table` is ember ps's own table
        "ID": "MACHINE ID", "Image": "IMAGE", "Command": "COMMAND", "CreatedAt": "CREATED AT",
        "RunningFor": "CREATED", "Ports": "PORTS", "State": "STATE", "Status": "STATUS",
        "Names": "NAMES", "Labels": "LABELS", "Networks": "NETWORKS", "Mounts": "MOUNTS",
        "LocalVolumes": "LOCAL VOLUMES",
    }  # fmt: skip
    missing = {
        "Size": "ember does not measure what a machine wrote to its disk",
        "Platform": "a machine's record does not keep its image's platform",
        "HealthStatus": "ember has no health checks",
        "IPAddresses": "not listed by ember ps (ember inspect shows the guest's address)",
    }
    return Schema("ember ps", headers, labels=True, missing=missing)


def find_machine(ref: str, home: Home | None = None) -> MachineState:
    """The machine ``ref`` names, its record repaired if its monitor is gone (which may
    remove a --rm machine: the caller shows lifecycle's warnings, ``warnings_as_messages``)."""
    from ember.machines.lifecycle import refresh
    from ember.machines.store import MachineStore

    home = home or home_from_ctx()
    return refresh(home, MachineStore(home).find(ref))


@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show stopped machines too.")
@click.option(
    "-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
    help="Only machines that match: id, name (regular expressions), label=KEY[=VALUE], "
    "status (created, running, restarting, exited...), exited=CODE, ancestor=IMAGE, "
    "before=MACHINE, since=MACHINE.  Repeat a key for any of its values.",
)  # fmt: skip
@click.option(
    "-n", "--last", type=WholeNumber(1, 2**31 - 1, "machines"), default=None,
    help="Show the N newest machines, whatever their state.",
)  # fmt: skip
@click.option("-l", "--latest", is_flag=True, help="Show the newest machine, whatever its state.")
@click.option("--no-trunc", is_flag=True, help="Do not shorten ids and commands.")
@click.option("-q", "--quiet", is_flag=True, help="Only print machine ids (--format is then ignored, as docker's).")
@json_option
@format_option
def ps(
    show_all: bool,
    filters: tuple[str, ...],
    last: int | None,
    latest: bool,
    no_trunc: bool,
    quiet: bool,
    as_json: bool,
    format_text: str | None,
) -> None:
    """List machines (running and restarting ones unless -a, -n, -l or a status filter).

    --format takes docker ps's template fields: .ID .Image .Command .CreatedAt
    .RunningFor .Ports .State .Status .Names .Labels .Networks .Mounts .LocalVolumes and
    .Label "KEY"."""
    from ember.machines.listing import Filters, select
    from ember.machines.state import RUNNING
    from ember.machines.store import MachineStore

    if as_json and quiet:  # (as image ls)
        raise UsageError("--json and --quiet cannot be used together")
    template = None
    if format_text:  # (goformat is imported only then: ps's start-up is measured)
        from ember.cli.goformat import from_options

        template = from_options(format_text, as_json, _ps_schema())
        if quiet:  # docker ps's rule: the template is checked, then -q wins
            say_error("warning: ignoring --format, because -q is set")
    chosen = Filters.parse(filters)  # before reading anything: a typo is said at once
    home = home_from_ctx()
    machines, damaged = MachineStore(home).scan()
    if show_all:
        for broken in damaged:  # listed on stderr: stdout keeps its format
            say_error(broken)
    if any(m.status == RUNNING or m.auto_remove for m in machines):
        # refresh only changes a record that says running (its monitor may be gone), or
        # a --rm one (its monitor may have died before removing it); without one, ps
        # skips importing the lifecycle and VMM layers (~20 ms)
        from ember.machines.lifecycle import refresh

        warnings_as_messages()  # refresh's, as ember: lines
        store = MachineStore(home)
        machines = [refresh(home, m) for m in machines]
        machines = [m for m in machines if not m.auto_remove or store.dir(m.id).is_dir()]
    ancestry: set[str] = set()
    if chosen.get("ancestor"):
        from ember.images import ImageService

        service = ImageService(home)
        for ref in chosen.get("ancestor"):
            ancestry |= service.known_as(ref)
    machines = select(
        machines, chosen, state_of=_state,
        show_all=show_all,
        last=1 if latest and last is None else last, ancestry=ancestry,
    )  # fmt: skip
    if as_json:
        print_json([_record(m) for m in machines])
        return
    if quiet:
        for m in machines:
            click.echo(m.id if no_trunc else m.short_id)
        return
    if template is not None:
        from ember.cli.goformat import Row

        click.echo(template.render(
            Row({name: _PS_FIELDS[name](m, no_trunc) for name in template.fields}, m.labels)
            for m in machines
        ), nl=False)  # fmt: skip
        return
    header = ("MACHINE ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES")
    rows = []
    for m in machines:
        rows.append((m.id if no_trunc else m.short_id, printable(m.image), _command(m, no_trunc),
                     ago(m.created_at), _status(m), _ports(m), m.name))  # fmt: skip
    # plain aligned columns (like docker ps): never wrapped, so scripts and narrow pipes
    # see one machine per line
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


class _TailLines(click.ParamType):
    """``--tail``: a number of lines, or ``all`` (docker's words)."""

    name = "N|all"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | None:
        if value is None or value == "all":
            return None
        text = str(value)
        if text.isascii() and text.isdigit() and len(text) <= 9:
            return int(text)
        self.fail(f"{text[:40]!r}: a number of lines or 'all'", param, ctx)


class _When(click.ParamType):
    """A point in time as ``docker logs --since/--until`` takes it (``logtimes.parse_when``),
    as unix nanoseconds; a duration counts back from when the command started."""

    name = "TIME"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        from ember.machines.logtimes import InvalidTime, parse_when

        # one "now" for --since and --until of one command (not the agent's start)
        now = time.time_ns() if ctx is None else ctx.meta.setdefault("ember.now_ns", time.time_ns())
        try:
            return parse_when(str(value), now)
        except InvalidTime:
            self.fail(
                f"{str(value)[:64]!r}: give a duration back from now (10m, 1h30m), a unix "
                "time (1796036000) or a date and time (2026-11-30T12:00:00Z)",
                param, ctx,
            )  # fmt: skip


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the machine ends.")
@click.option("-n", "--tail", "tail", type=_TailLines(), default="all", metavar="N|all",
              help="Only the last N lines of stdout and of stderr (default: all).")  # fmt: skip
@click.option("-t", "--timestamps", is_flag=True,
              help="Begin each line with the time it arrived (RFC 3339, UTC, nanoseconds).")  # fmt: skip
@click.option("--since", type=_When(), default=None,
              help="Only lines that arrived at or after TIME: a duration back from now "
              "(10m, 1h30m), a unix time, or a date and time (2026-11-30T12:00:00Z).")  # fmt: skip
@click.option("--until", type=_When(), default=None,
              help="Only lines that arrived at or before TIME (as --since); with -f, "
              "stop following then.")  # fmt: skip
@click.argument("machine")
def logs(
    follow: bool, tail: int | None, timestamps: bool, since: int | None, until: int | None,
    machine: str,
) -> None:  # fmt: skip
    """Print a machine's program output (stdout and stderr).

    The logs are capped (config.json's "logs" section): what is printed is what
    is kept, the rotated files oldest first, then the current ones.  Without -f,
    what they hold when the command starts (a guest that writes faster than the
    output is read does not keep it going).  The two streams are interleaved
    by the time each line arrived.  --tail counts the lines of each stream on
    its own (the two are kept in separate files); --since and --until then
    pick among those lines by their time."""
    from ember.machines.lifecycle import machine_channels, monitor_alive
    from ember.machines.logmerge import MergedStream, step
    from ember.machines.logs import LogFollower, LogSnapshot
    from ember.machines.logtimes import LineFilter, MarksReader
    from ember.machines.state import RUNNING, read_state
    from ember.machines.store import MachineStore

    home = home_from_ctx()
    warnings_as_messages()  # the machines area's, as ember: lines
    st = find_machine(machine)
    d = MachineStore(home).dir(st.id)
    channels = machine_channels(d)
    dated = timestamps or since is not None or until is not None
    with contextlib.ExitStack() as stack:
        streams: list[MergedStream] = []
        for p, dst in ((channels.stdout_log, sys.stdout.buffer), (channels.stderr_log, sys.stderr.buffer)):
            src: LogFollower | LogSnapshot
            if tail is None:
                src = LogFollower.oldest(p) if follow else LogSnapshot.take(p)
            else:
                snapshot = LogSnapshot.take(p)
                snapshot.keep_last_lines(tail)
                src = snapshot.follower(p) if follow else snapshot
            stack.callback(src.close)
            marks = MarksReader(p)
            stack.callback(marks.close)
            if isinstance(src, LogSnapshot):
                # the files' marks now: rotations while they are read drop files, marks too
                marks.hold(src.fds())
            line_filter = LineFilter(timestamps=timestamps, since=since, until=until) if dated else None
            streams.append(MergedStream(src, marks, dst, line_filter))
        while True:
            if step(streams):  # the stream whose next line came first (docker logs' order)
                continue
            if not follow:
                return
            if until is not None and time.time_ns() > until:
                follow = False  # nothing that comes now is wanted; one more pass drains
                continue
            try:
                now = read_state(d)
                # a record that says running while its monitor is gone (killed -9, the
                # OOM killer): the machine ended with it, and nothing will write more
                if now.status != RUNNING or not monitor_alive(now):
                    follow = False  # one more pass drains what is left
            except FileNotFoundError:
                follow = False
            time.sleep(0.1)


#: returned by a ``for_each`` action when there is nothing to say for that machine
SILENT = object()


def for_each(
    machines: tuple[str, ...], action: Callable[[str], object], *, parallel: bool = False
) -> None:
    """Run ``action`` on each machine, like docker: print each one done (its reference as
    given), report each failure, go on, fail at the end.  ``parallel``: on all machines at
    once (``docker stop a b`` stops both together), still reported in argument order.
    A parallel ``action`` runs in threads: it must not need click's context."""
    failed = False

    def report(ref: str, result: Callable[[], object]) -> None:
        nonlocal failed
        try:
            if result() is not SILENT:
                click.echo(ref)
        except EmberError as e:
            say_error(e)
            failed = True

    if parallel and len(machines) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(len(machines), 16), thread_name_prefix="ember-each") as pool:
            futures = [pool.submit(action, ref) for ref in machines]
            for ref, future in zip(machines, futures, strict=True):
                report(ref, future.result)
    else:
        for ref in machines:
            report(ref, functools.partial(action, ref))
    if failed:
        raise SystemExit(1)


stop_time_option = click.option(
    "-t", "--time", "timeout", type=WholeNumber(NO_STOP_TIMEOUT, 3600, "seconds"), default=None,
    help="Seconds to wait for a graceful stop before killing (-1: wait for ever; "
    "default: the machine's).",
)  # fmt: skip


def stop_gracefully(
    st: MachineState, timeout: int | None, home: Home | None = None
) -> MachineState:
    """``ember stop`` of one machine, ``-t`` (-1: no timeout) or else the machine's own
    stop timeout."""
    from ember.machines import lifecycle
    from ember.machines.controllines import stop_timeout_of

    home = home or home_from_ctx()
    if timeout is None:
        return lifecycle.stop(home, st, stop_timeout_of(st))
    return lifecycle.stop(home, st, None if timeout == NO_STOP_TIMEOUT else timeout)


@click.command()
@stop_time_option
@click.argument("machines", nargs=-1, required=True)
def stop(timeout: int | None, machines: tuple[str, ...]) -> None:
    """Stop machines gracefully (StopSignal, then SIGKILL after the timeout), all at once.

    A machine that is not running is no error (docker stop's rule)."""
    from ember.machines.errors import MachineNotRunning

    home = home_from_ctx()
    warnings_as_messages()  # the machines area's and the snapshotter's, as ember: lines

    def stop_one(ref: str) -> None:
        st = find_machine(ref, home)
        with contextlib.suppress(MachineNotRunning):  # stopped already: what was asked
            stop_gracefully(st, timeout, home)

    for_each(machines, stop_one, parallel=True)


def parse_kill_signal(text: str) -> int:
    """``kill -s``: a name with or without ``SIG`` (``HUP``, ``SIGHUP``, ``SIGRTMIN+3``)
    or a number, as docker takes them."""
    from ember.vm.errors import InvalidRunConfig
    from ember.vm.runconfig import parse_signal

    try:
        signo = parse_signal(text)
    except InvalidRunConfig:
        signo = 0
    if not 1 <= signo <= 64:
        raise click.BadParameter(
            f"{text!r}: not a signal (a name like HUP or SIGHUP, or 1-64)", param_hint="'-s' / '--signal'"
        )
    return signo


@click.command()
@click.option("-s", "--signal", "sig", default="KILL", show_default=True, metavar="SIGNAL",
              help="Signal to send the program (a name like HUP, SIGHUP, or a number).")  # fmt: skip
@click.argument("machines", nargs=-1, required=True)
def kill(sig: str, machines: tuple[str, ...]) -> None:
    """Kill machines' programs at once (exit code 137), or send them another signal."""
    import signal as _signal

    from ember.machines import lifecycle

    signo = parse_kill_signal(sig)
    home = home_from_ctx()
    warnings_as_messages()  # the machines area's, as ember: lines

    def kill_one(ref: str) -> None:
        st = find_machine(ref, home)
        if signo == _signal.SIGKILL:
            lifecycle.kill(home, st)
        else:
            lifecycle.send_signal(home, st, signo)

    for_each(machines, kill_one, parallel=True)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill running machines first; no error for a missing one.")
@click.argument("machines", nargs=-1, required=True)
def rm(force: bool, machines: tuple[str, ...]) -> None:
    """Remove machines (root disk, network, logs)."""
    from ember.machines import lifecycle
    from ember.machines.errors import DamagedMachine, MachineNotFound

    home = home_from_ctx()
    warnings_as_messages()  # the machines area's and the snapshotter's, as ember: lines

    def remove(ref: str) -> object:
        try:
            st = find_machine(ref, home)
        except DamagedMachine as e:
            if not force:
                raise
            lifecycle.remove_damaged(home, e.machine_id)
            return None
        except MachineNotFound:
            if force:
                return SILENT  # docker rm -f: nothing to remove is no error
            raise
        lifecycle.remove(home, st, force=force, notice=say)
        return None

    for_each(machines, remove)


@click.command()
@click.argument("machines", nargs=-1, required=True)
def inspect(machines: tuple[str, ...]) -> None:
    """Print machines' full records as JSON (the ones found; an error for each other)."""
    from ember.machines.store import MachineStore

    home = home_from_ctx()
    warnings_as_messages()  # the machines area's, as ember: lines
    out = []
    failed = False
    for ref in machines:
        try:
            st = find_machine(ref, home)
        except EmberError as e:
            say_error(e)
            failed = True
            continue
        data = _record(st)
        data["dir"] = str(MachineStore(home).dir(st.id))
        out.append(data)
    print_json(out)
    if failed:
        raise SystemExit(1)


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

    warnings_as_messages()  # the machines area's, as ember: lines
    st = find_machine(machine)
    ports = st.network.get("ports", []) if st.network and st.status == RUNNING else []
    lines = port_lines(ports, port)
    if port is not None and not lines:
        spec = port if "/" in port else f"{port}/tcp"
        raise EmberError(f"no public port {spec} is published for {st.name}")
    for line in lines:
        click.echo(line)


@click.command()
@click.argument("machine")
@click.argument("new_name")
def rename(machine: str, new_name: str) -> None:
    """Give MACHINE the name NEW_NAME (running or not)."""
    from ember.machines import lifecycle

    warnings_as_messages()  # the machines area's, as ember: lines
    lifecycle.rename(home_from_ctx(), find_machine(machine), new_name)


@click.command()
@click.argument("machines", nargs=-1, required=True)
def wait(machines: tuple[str, ...]) -> None:
    """Block until each machine has stopped, then print its exit code (one line each).

    As docker wait: every machine is looked up first and waited for together; the codes
    come in the order given, each as soon as it and those before it are known."""
    from ember.machines import state as mstate
    from ember.machines.lifecycle import refresh
    from ember.machines.store import MachineStore

    home = home_from_ctx()
    warnings_as_messages()  # the machines area's, as ember: lines
    store = MachineStore(home)
    failed = False
    # per argument: the machine (None: not found), then its code or error once known
    found: list[MachineState | None] = []
    for ref in machines:
        try:
            found.append(find_machine(ref, home))
        except EmberError as e:
            say_error(e)
            found.append(None)
            failed = True
    results: list[int | str | None] = [None] * len(found)
    shown = 0
    while True:
        for i, st in enumerate(found):
            if st is None or results[i] is not None:
                continue
            try:
                cur = refresh(home, mstate.read_state(store.dir(st.id)))
            except FileNotFoundError:
                code = mstate.removed_exit_code(home.run, st.id)
                results[i] = code if code is not None else (
                    f"machine {st.name} was removed before its exit code could be read"
                )  # fmt: skip
                continue
            except EmberError as e:
                results[i] = str(e)
                continue
            if cur.status == mstate.EXITED:
                results[i] = cur.exit_code if cur.exit_code is not None else 255
        while shown < len(found) and (found[shown] is None or results[shown] is not None):
            result = results[shown]
            if isinstance(result, int):
                click.echo(str(result))
            elif result is not None:
                say_error(result)
                failed = True
            shown += 1
        if shown == len(found):
            break
        time.sleep(0.05)
    if failed:
        raise SystemExit(1)


@click.command()
@click.argument("machines", nargs=-1, required=True)
def pause(machines: tuple[str, ...]) -> None:
    """Freeze running machines whole (their VMM stopped): nothing in them runs until
    ember unpause; stop, kill and exec are refused meanwhile."""
    from ember.machines import lifecycle

    home = home_from_ctx()
    for_each(machines, lambda ref: lifecycle.pause(home, find_machine(ref, home)))


@click.command()
@click.argument("machines", nargs=-1, required=True)
def unpause(machines: tuple[str, ...]) -> None:
    """Let paused machines run on."""
    from ember.machines import lifecycle

    home = home_from_ctx()
    for_each(machines, lambda ref: lifecycle.unpause(home, find_machine(ref, home)))


commands: list[click.Command] = [ps, logs, stop, kill, rm, inspect, port, rename, wait, pause, unpause]
