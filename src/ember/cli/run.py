"""``ember run``: boot an image as a micro-VM, like ``docker run``.

Foreground: the program's stdout and stderr are streamed to ours as the guest
writes them (kernel and init messages stay in the machine's console.log), and
ember exits with the program's exit code.  Ctrl-C asks the machine to stop
gracefully; a second Ctrl-C kills it.  ``-d`` prints the machine id and leaves
the machine running under its monitor.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ember.cli.common import WholeNumber, home_from_ctx, say_error, warnings_as_messages
from ember.cli.machines import stop_time_option
from ember.cli.sinks import OutputSink
from ember.errors import EmberError, UsageError
from ember.home import Home
from ember.machines.errors import MachineError, MachineNotRunning, MachineRestarting, MachineRunning

if TYPE_CHECKING:
    from ember.machines.events import EventReader, Exited, MonitorFailed
    from ember.machines.execclient import StdinRelay
    from ember.machines.lifecycle import MonitorHandle, StopRequested
    from ember.machines.logs import LogFollower
    from ember.machines.state import MachineState

DEFAULT_DISK_HELP = "the image's size plus headroom"


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # (stderr may be what cannot be written: 2>/dev/full)
        say_error(text)


def _pump(
    src: LogFollower, dst: OutputSink, limit: int = 16,
    until: tuple[tuple[int, int], int] | None = None,
) -> bool:
    """Copy what the log has (up to ``limit`` reads, up to the ``until`` end mark, while
    ``dst`` has room); True when something moved."""
    moved = False
    for _ in range(limit):
        if not dst.has_room():
            break
        data = src.read(1 << 16, until=until)
        if not data:
            break
        dst.put(data)
        moved = True
    return moved


def _drain(
    src: LogFollower, dst: OutputSink, mark: tuple[tuple[int, int], int] | None,
    intr: _Interrupts,
) -> None:
    """Copy the rest of the log, up to ``mark``, as its reader takes it; a signal
    meanwhile (Ctrl-C while our reader sleeps) ends the run now, the rest unread."""
    while True:
        if intr.pending:
            raise intr.exception()
        if dst.error is not None:
            raise dst.error
        if not dst.has_room():
            dst.wait_room(0.05)
        elif not _pump(src, dst, until=mark):
            return


def _wait_written(dst: OutputSink, intr: _Interrupts) -> None:
    while not dst.wait_written(0.05):
        if intr.pending:
            raise intr.exception()
    if dst.error is not None:
        raise dst.error


class _Interrupts:
    """The signals that reach an attached run, passed on to the machine as ``docker
    run`` passes them to its container: Ctrl-C or SIGTERM (``timeout``, ``kill``) stop
    it gracefully, a second one kills it; SIGHUP (its terminal closed, or the agent's
    client gone) is delivered to the program as SIGHUP, as docker's sig-proxy does."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.stops = 0  # SIGINT and SIGTERM: stop, then kill
        #: signals not acted on yet, in order (one before the hand-over undoes the machine)
        self.pending: list[int] = []
        #: (monotonic time, its stop timeout) after which a stopped machine still running
        #: is killed from the host, as `ember stop` does: a guest too busy to act on the
        #: stop (thrashing, hung) kept the run, and a `timeout`'s one SIGTERM, for ever
        self.kill_at: tuple[float, int] | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        self._old = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _on_signal(self, sig: int, _frame: object) -> None:
        self.pending.append(sig)

    def exception(self) -> KeyboardInterrupt:
        """What the last signal pending would have raised (the CLI's exit status tells
        them apart)."""
        from ember.cli.main import HungUp, Terminated

        last = self.pending[-1]
        if last == signal.SIGHUP:
            return HungUp()
        return Terminated() if last == signal.SIGTERM else KeyboardInterrupt()


class _Detached(Exception):
    """The detach keys were typed: this command lets go, the machine runs on."""


def _follow(
    home: Home,
    st: MachineState,
    events: EventReader | None,
    monitor_pid: int | None,
    outs: Sequence[LogFollower],
    intr: _Interrupts,
    stdin: StdinRelay | None = None,
) -> int:
    """Copy the machine's output until it ends; its exit code.  ``events``: those of the
    monitor this process started (None: attached to a machine already running, whose
    end is read from its record).  A run that ended before it started (its VMM failed
    during its set-up) is MachineError, as for ``run -d`` (``_await_start``).
    ``stdin``: our stdin to the machine's program once it runs (``-i``); the detach
    keys typed to it return 0 at once, the machine left running."""
    from ember.machines.store import MachineStore

    d = MachineStore(home).dir(st.id)
    stdout, stderr = outs
    out = OutputSink(sys.stdout.buffer, "stdout")
    try:
        err = OutputSink(sys.stderr.buffer, "stderr")
    except BaseException:
        out.close()
        raise
    sinks = ((stdout, out), (stderr, err))
    try:
        return _copy_until_exit(home, st, d, events, monitor_pid, sinks, intr, stdin)
    except _Detached:
        return 0
    except BrokenPipeError:
        # Whoever read our output went away (`ember run IMAGE yes | head -1`): the
        # program gets SIGPIPE, as it would in that pipeline on its next write, rather
        # than run on unread (with --rm: for ever); ember exits 141 (main.py).
        _pass_sigpipe(home, d)
        raise
    finally:
        if stdin is not None:
            stdin.close()  # (the terminal back as it was, before anything more is said)
        for _, sink in sinks:
            sink.close()


def _start_relay(stdin: StdinRelay) -> None:
    """Begin passing stdin on; a machine that cannot take it (an init from before
    ``run -i``, its exec ports all taken) runs on without it, and we say so."""
    try:
        stdin.start()
    except EmberError as e:
        _say(str(e))
    except OSError as e:
        from ember.cli.main import describe_os_error

        _say(f"cannot pass stdin to the machine: {describe_os_error(e)}")


def _pass_sigpipe(home: Home, d: Path) -> None:
    from ember.machines import lifecycle
    from ember.machines.state import RUNNING

    st = _current(home, d)
    if st is not None and st.status == RUNNING:
        with contextlib.suppress(EmberError):  # ended meanwhile: nothing to tell it
            lifecycle.send_signal(home, st, signal.SIGPIPE)


def _copy_until_exit(
    home: Home,
    st: MachineState,
    d: Path,
    events: EventReader | None,
    monitor_pid: int | None,
    sinks: tuple[tuple[LogFollower, OutputSink], ...],
    intr: _Interrupts,
    stdin: StdinRelay | None = None,
) -> int:
    from ember.machines import lifecycle
    from ember.machines.events import Exited, MonitorFailed, Started
    from ember.machines.report import said_on_program_stderr
    from ember.machines.state import EXITED, RUNNING, read_state, removed_exit_code

    exited: Exited | None = None
    lost: OutputSink | None = None  # a stream of ours that could not be written
    started = False  # the monitor said so (its events only)
    stopping: StopRequested | None = None
    attached = read_state(d) if events is None else None
    started_at = attached.started_at if attached is not None else None
    seen: MachineState | None = None  # attached to a running machine: its last record read
    ended = False
    relaying = False  # stdin: passed on since the machine runs
    try:
        moved = False
        while exited is None and not ended:
            if stdin is not None and not relaying and (started or events is None):
                _start_relay(stdin)
                relaying = True
            if stdin is not None and stdin.detached.is_set():
                raise _Detached
            if stdin is not None and stdin.error is not None:
                _say(str(stdin.error))
                stdin.error = None
            # no wait while output flows (the monitor's logs are capped: a reader
            # that falls too far behind a rotating log loses the oldest part)
            ready: list[EventReader] = []
            if events is None:
                time.sleep(0 if moved else 0.02)
                now = _current(home, d)  # None: removed (--rm) after it ended
                seen = now or seen
                ended = now is None or now.status != RUNNING or now.started_at != started_at
            else:
                ready, _, _ = select.select([events], [], [], 0 if moved else 0.02)
            moved = False
            for src, dst in sinks:
                moved = _pump(src, dst) or moved
                if isinstance(dst.error, BrokenPipeError):
                    raise dst.error  # our reader went away (EPIPE)
                if dst.error is not None and lost is None:
                    # a full disk or an I/O error behind `> file`: the output is lost from
                    # here on, and a machine left running would be nobody's (with --rm,
                    # for ever): stopped, as on Ctrl-C, and the run fails (125)
                    lost = dst
                    intr.pending.append(signal.SIGTERM)
            while intr.pending:
                stopping = _pass_on(home, d, intr, intr.pending.pop(0)) or stopping
            if intr.kill_at is not None and time.monotonic() >= intr.kill_at[0]:
                _kill_unstopped(home, d, intr)
            if not ready or events is None:
                continue
            for event in events.read_some():
                if isinstance(event, Exited):
                    exited = event
                elif isinstance(event, Started):
                    started = True
                elif isinstance(event, MonitorFailed):
                    raise MachineError(event.message)
            if events.closed:
                break  # the monitor went away without saying how it ended
    finally:
        if stopping is not None:
            stopping.close()
    # this run's output ends where the logs end now: a --restart run appends to the same
    # files (a reader still behind read on into it, and held its rotations back); both
    # marks before either stream is drained (stdout's backlog may take a while)
    marks = [src.end_mark() for src, _ in sinks]
    for (src, dst), mark in zip(sinks, marks, strict=True):
        if dst is not lost:  # (what could not be written is said below)
            _drain(src, dst, mark, intr)
    for _, dst in sinks:
        if dst is not lost:
            _wait_written(dst, intr)
    # the monitor finishes its cleanup (network, --rm) before we return, like docker run
    # --rm; one that restarts the machine (--restart) goes on by itself
    if monitor_pid is not None and not (exited is not None and exited.restarting):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(monitor_pid, 0)
    if lost is not None and lost.error is not None:
        raise MachineError(
            f"cannot write the machine's {lost.name}: {lost.error.strerror or lost.error}; "
            "it was stopped"
        )
    if exited is None:
        if (events is None and attached is not None and seen is not None
                and seen.started_at != started_at
                and seen.restart_count == attached.restart_count + 1
                and seen.previous_exit_code is not None):  # fmt: skip
            # its restart policy began the next run between two looks: the record is that
            # run's now, and keeps the code of the one this followed
            return seen.previous_exit_code
        if events is None and seen is not None and seen.status == EXITED:
            end: MachineState | None = seen  # (its restart policy may run it again soon)
        else:
            try:
                end = lifecycle.wait_exited(home, read_state(d), 5)
            except FileNotFoundError:
                end = seen  # removed (--rm) once it ended
        if (end is None or end.exit_code is None) and events is None:
            # removed (--rm) between two looks: its monitor kept its exit code a while,
            # for `ember wait` and for this
            kept = removed_exit_code(home.run, st.id)
            if kept is not None:
                return kept
            raise MachineError("the machine ended and was removed (--rm) before its exit "
                               "code could be read")  # fmt: skip
        if end is None or end.exit_code is None:
            raise MachineError("the machine's monitor ended without reporting an exit code")
        if end.end_reason:
            _say(f"machine ended: {end.end_reason}")
        if events is not None and end.auto_remove and end.status == EXITED:
            lifecycle.remove(home, end)  # --rm: what its monitor would have done
        return end.exit_code
    if not started and not exited.stopped_by_user:
        # ember's failure, not the program's: 125 and the VMM's last words, as run -d
        raise _not_started(st, exited)
    if exited.error and not said_on_program_stderr(exited.exit_code, exited.error):
        _say(exited.error)  # (a child's reason is on the program's stderr already)
    if exited.end_reason:
        _say(f"machine ended: {exited.end_reason}")
    return exited.exit_code


def _pass_on(home: Home, d: Path, intr: _Interrupts, sig: int) -> StopRequested | None:
    """Act on a signal that reached an attached run (``_Interrupts``); the stop it asked
    for (its control connection kept open until the machine ends), if any."""
    from ember.machines import lifecycle
    from ember.machines.controllines import stop_timeout_of
    from ember.machines.state import CREATED, RUNNING

    st = _current(home, d)
    # handed over, its monitor starting the VMM: a stop now ends it before the program
    # runs (it was dropped, and the machine ran on, a `timeout`'s SIGTERM lost)
    starting = st is not None and st.status == CREATED and not st.restarting
    if st is None or (st.status != RUNNING and not starting):
        return None  # it ended by itself meanwhile: nothing to pass on, no restart lost
    if sig == signal.SIGHUP:
        if not starting:  # (no program yet to deliver it to)
            with contextlib.suppress(EmberError):  # `ember kill -s HUP`'s way; gone: fine
                lifecycle.send_signal(home, st, signal.SIGHUP)
        return None
    intr.stops += 1
    if intr.stops > 1:
        _say(f"killing {st.name}")
        with contextlib.suppress(EmberError):
            # not waiting for the end here: the monitor's last drain waits for this
            # run to read the logs (attached), which the copy loop does meanwhile
            lifecycle.kill_vmm(home, st, wait=False)
        return None
    again = "Ctrl-C" if sig == signal.SIGINT else "the signal"
    _say(f"stopping {st.name} ({again} again to kill it)")
    try:
        # the machine's own timeout (-1: none), as `ember stop` sends it
        asked = lifecycle.request_stop(home, st, stop_timeout_of(st), starting=starting)
    except MachineNotRunning:
        return None  # it ended just now
    if asked.conn is None and asked.failure is None:
        return None  # marked before it ran: its monitor ends it as the VMM starts
    if asked.conn is None:
        now = _current(home, d)
        if now is None or now.status != RUNNING:
            return None  # it ended just now
        _say(f"{asked.failure}: killing it")
        lifecycle.kill_vmm(home, asked.machine, wait=False)
        return None
    if asked.timeout is not None and asked.kill_after is not None:  # (both or neither)
        intr.kill_at = (time.monotonic() + asked.kill_after, asked.timeout)
    return asked


def _kill_unstopped(home: Home, d: Path, intr: _Interrupts) -> None:
    """The stop's time is up and the machine still runs: kill its VMM, as `ember stop`
    does after the stop timeout and a grace period."""
    from ember.machines import lifecycle
    from ember.machines.state import RUNNING

    assert intr.kill_at is not None
    timeout = intr.kill_at[1]
    intr.kill_at = None
    st = _current(home, d)
    if st is None or st.status != RUNNING:
        return
    _say(f"{st.name} did not stop within {timeout:g} s: killing it")
    with contextlib.suppress(EmberError):  # gone meanwhile: fine
        lifecycle.kill_vmm(home, st, wait=False)


def _next_run(home: Home, st: MachineState) -> MachineState:
    """``start -a`` of a machine between two runs of its restart policy: its record once
    its monitor runs it again (attached to then, as docker's ``start -a`` of a
    restarting container; it was refused), or once it no longer waits to (stopped
    meanwhile, or the policy gave up: started then as any exited machine).  Any other
    machine's record as it is."""
    from ember.machines.errors import MachineNotFound
    from ember.machines.lifecycle import restart_pending
    from ember.machines.store import MachineStore

    d = MachineStore(home).dir(st.id)
    while restart_pending(st):
        time.sleep(0.05)
        now = _current(home, d)
        if now is None:
            raise MachineNotFound(f"machine {st.name} was removed meanwhile")
        st = now
    return st


def _current(home: Home, d: Path) -> MachineState | None:
    """The machine's record now (repaired if its monitor is gone); None once removed."""
    from ember.machines import lifecycle
    from ember.machines.state import read_state

    try:
        return lifecycle.refresh(home, read_state(d))
    except FileNotFoundError:
        return None


class _RunCommand(click.Command):
    """``docker run``'s convention: 125 when the failure is ember's (a bad option, an
    image not found, no kernel), so that a script can tell it from the program's own
    exit status, which ``ember run`` returns as it is."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise _RunUsageError(e.format_message(), e.ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EmberError as e:
            e.exit_code = RUN_FAILED
            raise
        except BrokenPipeError:
            raise  # stdout closed: ember's caller went away (141, as for SIGPIPE)
        except OSError as e:
            # the host refused ember something (a full disk, a path that is a file):
            # ember's failure, not the program's exit status 1
            from ember.cli.main import describe_os_error

            failed = EmberError(describe_os_error(e))
            failed.exit_code = RUN_FAILED
            raise failed from e


#: ``ember run``'s exit status when ember, not the program, failed (as docker's)
RUN_FAILED = 125


class _RunUsageError(click.UsageError):
    exit_code = RUN_FAILED


@click.command(cls=_RunCommand, context_settings={"allow_interspersed_args": False})
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the machine when it exits.")
@click.option("--restart", "restart", default="no", show_default=True,
              metavar="no|on-failure[:MAX]|always|unless-stopped",
              help="Run the machine again when it ends (not after ember stop/kill).")  # fmt: skip
@click.option("-d", "--detach", is_flag=True, help="Run in the background; print the machine id.")
@click.option("-i", "--interactive", is_flag=True,
              help="Keep the program's stdin open, and pass it ours (unless -d).")  # fmt: skip
@click.option("-t", "--tty", is_flag=True,
              help="Give the program a terminal (Ctrl-P Ctrl-Q lets go of it, with -i).")  # fmt: skip
@click.option("--name", help="Name of the machine (unique; default: generated).")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY[=VALUE]",
              help="Set an environment variable (bare KEY: take it from this environment).")  # fmt: skip
@click.option("--env-file", "env_files", multiple=True, type=click.Path(path_type=Path),
              help="Read KEY=VALUE lines from a file.")  # fmt: skip
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY[=VALUE]",
              help="Set a label on the machine (ember ps --filter label=KEY[=VALUE]).")  # fmt: skip
@click.option("--entrypoint", help='Override the image\'s entrypoint ("" clears it).')
@click.option("-u", "--user", help="NAME, UID, NAME:GROUP or UID:GID (resolved in the image).")
@click.option("-w", "--workdir", help="Working directory inside the machine.")
@click.option("-p", "--publish", "publish", multiple=True,
              metavar="[[HOST_IP:][HOST_PORT[-END]]:]GUEST_PORT[-END][/tcp|udp]",
              help="Publish a port (or a range); without HOST_PORT, or with a host range for one port, ember picks a free one.")  # fmt: skip
@click.option("-P", "--publish-all", is_flag=True,
              help="Publish every port the image exposes (EXPOSE) on a host port ember picks.")  # fmt: skip
@click.option("--memory", "-m", "memory", default="512", show_default=True,
              help="Guest memory in MiB (or with a unit: 1G).")  # fmt: skip
@click.option("--cpus", type=WholeNumber(1, 64, "vCPUs"), default=1, show_default=True)
@click.option("--disk-size", help=f"Root disk size, e.g. 2G (default: {DEFAULT_DISK_HELP}).")
@click.option("--kernel", type=click.Path(path_type=Path, dir_okay=False),
              help="Boot this kernel (bzImage or ELF) instead of the installed one.")  # fmt: skip
@click.option("--kernel-modules", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="lib/modules/VERSION (with modules.dep) for --kernel.")  # fmt: skip
@click.option("--kernel-arg", "kernel_args", multiple=True, metavar="ARG",
              help="Add a guest kernel argument (debugging, e.g. loglevel=7).")  # fmt: skip
@click.option("--stop-timeout", type=click.IntRange(-1, 3600),
              help="Seconds between the stop signal and SIGKILL (default 10; -1: no SIGKILL).")  # fmt: skip
@click.option("--network", default="default", show_default=True,
              help="Machines see each other only within the same network.")  # fmt: skip
@click.option("-v", "--volume", "volumes", multiple=True, metavar="NAME:TARGET[:ro][,nocopy]",
              help="Mount volume NAME (made if new) at TARGET in the machine; an empty volume "
                   "gets the image's files at TARGET first, unless nocopy.")  # fmt: skip
@click.option("--hostname", help="The machine's hostname (default: its short id).")
@click.option("--add-host", "add_hosts", multiple=True, metavar="NAME:ADDRESS",
              help="Add a line to the machine's /etc/hosts (ADDRESS host-gateway: the host).")  # fmt: skip
@click.option("--dns", "dns", multiple=True, metavar="ADDRESS",
              help="A nameserver for the machine (instead of the host's).")  # fmt: skip
@click.option("--dns-search", "dns_search", multiple=True, metavar="DOMAIN",
              help="A DNS search domain for the machine.")  # fmt: skip
@click.option("--plain-http", is_flag=True, help="Pull over plain HTTP.")
@click.argument("image")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(
    auto_remove: bool,
    restart: str,
    detach: bool,
    interactive: bool,
    tty: bool,
    name: str | None,
    env: tuple[str, ...],
    env_files: tuple[Path, ...],
    labels: tuple[str, ...],
    entrypoint: str | None,
    user: str | None,
    workdir: str | None,
    publish: tuple[str, ...],
    publish_all: bool,
    memory: str,
    cpus: int,
    disk_size: str | None,
    kernel: Path | None,
    kernel_modules: Path | None,
    kernel_args: tuple[str, ...],
    stop_timeout: int | None,
    network: str,
    volumes: tuple[str, ...],
    hostname: str | None,
    add_hosts: tuple[str, ...],
    dns: tuple[str, ...],
    dns_search: tuple[str, ...],
    plain_http: bool,
    image: str,
    args: tuple[str, ...],
) -> None:
    """Run IMAGE in a new micro-VM."""
    from ember.machines import lifecycle
    from ember.machines.options import (
        check_hostname,
        check_kernel_args,
        check_name,
        check_user,
        parse_add_hosts,
        parse_dns,
        parse_dns_search,
        parse_env,
        parse_labels,
        parse_memory_mib,
        read_env_file,
    )
    from ember.machines.restartpolicy import parse_restart_policy
    from ember.net.nftables import check_requested_network
    from ember.net.ports import check_port_count, parse_publish
    from ember.sizes import parse_size
    from ember.volumes.spec import parse_volumes

    home = home_from_ctx()
    warnings_as_messages()  # the snapshotter's, as ember: lines
    if kernel_modules is not None and kernel is None:
        raise UsageError("--kernel-modules needs --kernel")
    if tty and interactive and not detach and not sys.stdin.isatty():
        raise UsageError("the input device is not a terminal: use -i without -t")
    host_cpus = os.cpu_count()
    if host_cpus is not None and cpus > host_cpus:  # as docker refuses it
        raise UsageError(f"--cpus {cpus}: this host has only {host_cpus} CPU(s)")
    policy = parse_restart_policy(restart)
    if auto_remove and policy.name != "no":
        raise UsageError("--rm and --restart cannot go together (a removed machine cannot restart)")
    if name is not None:
        check_name(name)
    if user is not None:
        check_user(user)
    network = check_requested_network(network)
    ports = tuple(m for p in publish for m in parse_publish(p))
    check_port_count(ports)  # before the image is pulled (-P's are counted once it is)
    host_env = dict(os.environ)
    all_env: list[str] = []
    for f in env_files:
        all_env += read_env_file(f, host_env)
    all_env += parse_env(env, host_env)
    req = lifecycle.RunRequest(
        image=image,
        args=tuple(args),
        name=name,
        env=tuple(all_env),
        labels=parse_labels(labels),
        entrypoint=None if entrypoint is None else ((entrypoint,) if entrypoint else ()),
        user=user,
        workdir=workdir,
        ports=ports,
        publish_all=publish_all,
        memory_mib=parse_memory_mib(memory),
        cpus=cpus,
        disk_size=parse_size(disk_size) if disk_size else None,
        kernel=kernel,
        kernel_modules=kernel_modules,
        kernel_args=check_kernel_args(kernel_args),
        auto_remove=auto_remove,
        restart=policy,
        network=network,
        stop_timeout=stop_timeout,
        plain_http=plain_http,
        hostname=None if hostname is None else check_hostname(hostname),
        extra_hosts=parse_add_hosts(add_hosts),
        dns=parse_dns(dns),
        dns_search=parse_dns_search(dns_search),
        volumes=parse_volumes(volumes),
        interactive=interactive,
        tty=_terminal_size() if tty else None,
    )
    # the monitor starts first: its start-up overlaps with preparing the machine
    monitor = lifecycle.start_monitor(home)
    made: list[str] = []
    try:
        st = lifecycle.create(home, req, progress=_say, made=made, monitor_pid=monitor.pid)
        code = _launch(home, st, monitor, attach=not detach, with_stdin=interactive)
    except BaseException:
        # until the monitor has it, the machine is ours to remove (an interrupt, SIGTERM,
        # a failure anywhere from create to the hand-over): nothing of it may stay
        if not monitor.handed:
            from ember.snapshots.interrupts import deferred

            with deferred():
                monitor.abandon()
                for machine_id in made:
                    with contextlib.suppress(EmberError):
                        lifecycle.discard(home, machine_id)
        monitor.close()
        raise
    if code is None:
        click.echo(st.id)
        return
    raise SystemExit(code)


def _terminal_size() -> tuple[int, int]:
    """(rows, columns) of the terminal on our stdin, else stdout; docker's 24 x 80 without one."""
    for fd in (0, 1):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    return 24, 80


def _launch(
    home: Home,
    st: MachineState,
    monitor: MonitorHandle,
    *,
    attach: bool,
    fresh_logs: bool = True,
    with_stdin: bool = False,
) -> int | None:
    """Hand a prepared machine to its monitor; attached, follow it to its end and return
    the program's exit code, else return None once it started.  Until
    ``monitor.handed``, the machine is the caller's to undo (whatever was raised);
    ``fresh_logs``: the logs are new (else only what this run writes is followed);
    ``with_stdin``: our stdin goes to the program (``run -i``).

    Attached, Ctrl-C and SIGTERM are counted from the start: one before the hand-over
    raises (the caller undoes the machine), one after it stops the machine (``_follow``)
    rather than leave it running unwatched."""
    from ember.machines.events import EventReader
    from ember.machines.lifecycle import machine_channels
    from ember.machines.logs import LogFollower
    from ember.machines.store import MachineStore

    channels = machine_channels(MachineStore(home).dir(st.id))
    events = EventReader(monitor.sync_r)
    outs: list[LogFollower] = []
    try:
        with _Interrupts() if attach else contextlib.nullcontext() as intr:
            if intr is not None:
                # open the logs before the machine can write (and before --rm can delete
                # them); the followers go on across the monitor's rotations
                for p in (channels.stdout_log, channels.stderr_log):
                    outs.append(LogFollower.current(p, hold=True, at_end=not fresh_logs))
                if intr.pending:
                    raise intr.exception()
            monitor.hand_over(st)
            if intr is None:
                _await_start(st, events)
                return None
            stdin = _stdin_relay(home, st) if with_stdin else None
            code = _follow(home, st, events, monitor.pid, outs, intr, stdin)
    finally:
        monitor.close()
        for out in outs:
            out.close()
    sys.stdout.flush()
    return code


def _await_start(st: MachineState, events: EventReader) -> None:
    """Return once the monitor says the machine started (its VMM got through its own
    set-up: a restored guest took its config, a booting VMM stayed up, see the monitor);
    MachineError with the reason when it did not, as ``docker run -d`` fails for a
    container that cannot start: the monitor's error, or the VMM's last words (the
    record's ``end_reason``) when it ended before that point."""
    from ember.machines.events import MonitorFailed, Started

    event = events.next()
    if not isinstance(event, Started):
        raise _not_started(st, event or MonitorFailed("monitor died"))


def _not_started(st: MachineState, event: Exited | MonitorFailed) -> MachineError:
    """The error of a machine that ended (or whose monitor failed) before it started:
    the monitor's ``event`` says why."""
    from ember.machines.events import Exited

    if isinstance(event, Exited):
        why = event.end_reason or event.error or f"exit code {event.exit_code}"
    else:
        why = event.message
    return MachineError(f"machine {st.name} did not start: {why}")


def _stdin_relay(home: Home, st: MachineState) -> StdinRelay:
    from ember.machines.execclient import StdinRelay
    from ember.machines.store import MachineStore

    return StdinRelay(MachineStore(home).dir(st.id), st, sys.stdin.fileno(),
                      tty=bool(st.config.get("tty")))  # fmt: skip


def _attach_running(home: Home, st: MachineState, *, with_stdin: bool = False) -> int:
    """``ember start -a`` of a running machine, and ``ember attach``: its output from now
    on, and its exit code when it ends (Ctrl-C stops it, as for ``run``); with
    ``with_stdin``, our stdin goes to its program."""
    from ember.machines.lifecycle import machine_channels
    from ember.machines.logs import LogFollower
    from ember.machines.state import RUNNING
    from ember.machines.store import MachineStore

    d = MachineStore(home).dir(st.id)
    channels = machine_channels(d)
    outs: list[LogFollower] = []
    try:
        with _Interrupts() as intr:
            for p in (channels.stdout_log, channels.stderr_log):
                outs.append(LogFollower.current(p, hold=True, at_end=True))
            now = _current(home, d)
            if now is None or now.status != RUNNING:
                raise MachineError(f"machine {st.name} is not running any more")
            stdin = _stdin_relay(home, st) if with_stdin else None
            code = _follow(home, st, None, None, outs, intr, stdin)
    finally:
        for out in outs:
            out.close()
    sys.stdout.flush()
    return code


def _start_one(
    home: Home, st: MachineState, *, attach: bool, with_stdin: bool = False
) -> int | None:
    """``ember start`` of one exited machine (see ``lifecycle.prepare_start``)."""
    from ember.machines import lifecycle
    from ember.snapshots.interrupts import deferred

    monitor = lifecycle.start_monitor(home)
    prepared = False
    try:
        with deferred():  # (quick) no moment when it is prepared and we do not know it
            st = lifecycle.prepare_start(home, st, monitor_pid=monitor.pid)
            prepared = True
        return _launch(home, st, monitor, attach=attach, fresh_logs=False, with_stdin=with_stdin)
    except BaseException:
        if not monitor.handed:
            with deferred():
                monitor.abandon()
                if prepared:
                    lifecycle.abandon_start(home, st, "the machine's monitor did not take it")
        monitor.close()
        raise


def _becomes_running(home: Home, machine_id: str, seconds: float) -> bool:
    from ember.machines.state import CREATED, RUNNING
    from ember.machines.store import MachineStore

    d = MachineStore(home).dir(machine_id)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        st = _current(home, d)
        if st is None or st.status != CREATED:
            return st is not None and st.status == RUNNING
        time.sleep(0.1)
    return False


@click.command()
@click.option("-a", "--attach", is_flag=True,
              help="Follow the machine's output and exit with its program's exit code.")  # fmt: skip
@click.option("-i", "--interactive", is_flag=True,
              help="Attach, and pass our stdin to the program (a machine run with -i).")  # fmt: skip
@click.argument("machines", nargs=-1, required=True)
def start(attach: bool, interactive: bool, machines: tuple[str, ...]) -> None:
    """Start exited machines again (same root disk, logs and settings; a running one is
    left alone)."""
    from ember.cli.machines import find_machine, for_each
    from ember.machines.state import RUNNING

    home = home_from_ctx()
    warnings_as_messages()  # the snapshotter's, as ember: lines
    if attach or interactive:
        if len(machines) != 1:
            raise UsageError(f"--{'attach' if attach else 'interactive'} takes one machine")
        st = _next_run(home, find_machine(machines[0]))
        with_stdin = interactive and bool(st.config.get("open_stdin"))
        if with_stdin and st.config.get("tty") and not sys.stdin.isatty():
            raise UsageError("the input device is not a terminal (the machine's program has one)")
        if st.status == RUNNING:  # docker start -a: attach to it
            raise SystemExit(_attach_running(home, st, with_stdin=with_stdin))
        code = _start_one(home, st, attach=True, with_stdin=with_stdin)
        raise SystemExit(code)

    def start_one(ref: str) -> None:
        st = find_machine(ref)
        if st.status == RUNNING:  # like docker start: a running machine is no error
            return
        try:
            _start_one(home, st, attach=False)
        except MachineRestarting:
            return  # its policy runs it again: as docker's, that counts as running
        except MachineRunning:
            # another `ember start` (or run) of it is under way: once it runs, this
            # start has what it asked for, as a second `docker start` has
            if not _becomes_running(home, st.id, 15):
                raise

    for_each(machines, start_one)


@click.command()
@stop_time_option
@click.argument("machines", nargs=-1, required=True)
def restart(timeout: int | None, machines: tuple[str, ...]) -> None:
    """Stop machines (gracefully, as ember stop) and start them again, all at once."""
    from ember.cli.machines import find_machine, for_each, stop_gracefully
    from ember.machines.lifecycle import restart_pending
    from ember.machines.state import RUNNING

    home = home_from_ctx()
    warnings_as_messages()  # the snapshotter's, as ember: lines

    # runs in a thread of its own per machine (for_each): home passed, no click context
    def restart_one(ref: str) -> None:
        st = find_machine(ref, home)
        if st.auto_remove:
            raise UsageError(f"machine {st.name} was run with --rm: stopping it removes it")
        if st.status == RUNNING or restart_pending(st):
            # running, or between two runs of its restart policy (whose monitor must not
            # run it beside the new one): stopped first; one that has ended meanwhile is
            # started all the same.  One being made or started by another command is
            # left to it (the start below says so).
            with contextlib.suppress(MachineNotRunning):
                st = stop_gracefully(st, timeout, home)
        _start_one(home, st, attach=False)

    # together, as stop and kill: `restart a b` takes as long as the slower machine
    for_each(machines, restart_one, parallel=True)


@click.command()
@click.option("--no-stdin", is_flag=True, help="Do not pass our stdin to the program.")
@click.argument("machine")
def attach(no_stdin: bool, machine: str) -> None:
    """Follow a running MACHINE's output from now on and exit with its program's exit
    code; pass our stdin to the program when it was run with -i.  Ctrl-C stops the
    machine, as for run; with a terminal (run -it), Ctrl-P Ctrl-Q lets go of it."""
    from ember.cli.machines import find_machine
    from ember.machines.pause import refuse_if_paused
    from ember.machines.state import RUNNING
    from ember.machines.store import MachineStore

    home = home_from_ctx()
    st = find_machine(machine)
    if st.status != RUNNING:
        raise MachineNotRunning(f"machine {st.name} is not running",
                                hint=f"start it and follow it: ember start -a {st.name}")  # fmt: skip
    refuse_if_paused(MachineStore(home).dir(st.id), st, "attach to")
    with_stdin = not no_stdin and bool(st.config.get("open_stdin"))
    if with_stdin and st.config.get("tty") and not sys.stdin.isatty():
        raise UsageError("the input device is not a terminal (the machine's program has one)",
                         hint="ember attach --no-stdin follows its output only")  # fmt: skip
    raise SystemExit(_attach_running(home, st, with_stdin=with_stdin))


commands: list[click.Command] = [run, start, restart, attach]
