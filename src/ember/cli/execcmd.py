"""``ember exec``: run a command in a running machine, beside its program (docker exec)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import click

from ember.cli.common import home_from_ctx, printable


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Pass this command's stdin to it.")
@click.option("-d", "--detach", is_flag=True, help="Start it and return; its output is dropped.")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY[=VALUE]",
              help="Set an environment variable (KEY alone: its value here, if set).")  # fmt: skip
@click.option("--env-file", "env_files", multiple=True, type=click.Path(path_type=Path),
              help="Read KEY=VALUE lines from a file (-e wins over them).")  # fmt: skip
@click.option("-u", "--user", default="", metavar="USER[:GROUP]",
              help="Run as this user (default: the program's).")
@click.option("-w", "--workdir", default="", metavar="DIR",
              help="Start in this directory (default: the program's).")
@click.option("-t", "--tty", is_flag=True,
              help="Give it a terminal (its output then all comes on stdout).")
@click.argument("machine")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive: bool, detach: bool, env: tuple[str, ...], env_files: tuple[Path, ...],
          user: str, workdir: str, tty: bool, machine: str, command: tuple[str, ...]) -> None:  # fmt: skip
    """Run COMMAND in the running MACHINE, with the program's environment, user and
    working directory unless -e, -u or -w say otherwise; exit with its exit code.
    Ctrl-C is passed on to it (with -t, it is a key for its terminal); a second one, or
    this command's end, ends it."""
    from ember.cli.machines import find_machine
    from ember.errors import UsageError
    from ember.machines.execclient import run_exec
    from ember.machines.execproto import ExecRequest
    from ember.machines.options import parse_env, read_env_file
    from ember.machines.pause import refuse_if_paused
    from ember.machines.store import MachineStore

    if tty and interactive and not sys.stdin.isatty():
        raise UsageError("the input device is not a terminal: use -i without -t")
    if workdir and not workdir.startswith("/"):
        raise UsageError(f"-w {workdir!r}: the working directory must be an absolute path")
    if detach and interactive:
        raise UsageError("-d and -i cannot be used together")
    host_env = dict(os.environ)
    variables: list[str] = []
    for f in env_files:  # before the machine is looked up: a bad file is the user's mistake
        variables += read_env_file(f, host_env)
    variables += parse_env(env, host_env)
    home = home_from_ctx()
    st = find_machine(machine, home)
    refuse_if_paused(MachineStore(home).dir(st.id), st, "exec in")
    request = ExecRequest(list(command), variables, user, workdir, detach=detach,
                          tty=(0, 0) if tty else None)  # (its size: the client's terminal's)
    code = run_exec(MachineStore(home).dir(st.id), st, request,
                    stdin_fd=sys.stdin.fileno() if interactive else None)  # fmt: skip
    raise SystemExit(code)


#: docker top's columns (``ps -ef``'s), as ``ember-init --ps`` gives them
TOP_COLUMNS = ("UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD")


def top_table(rows: list[list[str]]) -> str:
    """docker top's layout: every column but the last at least 20 wide, 3 spaces after
    its widest cell (Go's tabwriter as docker sets it up)."""
    table = [list(TOP_COLUMNS), *rows]
    widths = [max(20, max(len(r[i]) for r in table) + 3) for i in range(len(TOP_COLUMNS) - 1)]
    return "".join(
        "".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + r[-1] + "\n" for r in table
    )


def parse_ps(text: str) -> list[list[str]]:
    """``ember-init --ps``'s lines: eight tab-separated fields each (the command may hold
    tabs of its own: only the first seven split).  Lines end at ``\n`` only (a guest's
    text may hold what ``str.splitlines`` also breaks at); a line whose PID, PPID or C
    is not a number is not one of its rows."""
    rows = []
    for line in text.split("\n"):
        fields = line.split("\t", len(TOP_COLUMNS) - 1)
        if len(fields) == len(TOP_COLUMNS) and all(fields[i].isascii() and fields[i].isdigit()
                                                  for i in (1, 2, 3)):  # fmt: skip
            rows.append([printable(f) for f in fields])
    return rows


#: what ``ember top`` takes from the guest at most, and how long it waits for it
TOP_OUTPUT_MAX = 16 << 20
TOP_TIMEOUT = 30.0


def _capture(run: Callable[[int], int]) -> tuple[int, bytes, str | None]:
    """``run(fd)``'s exit code and what it wrote to ``fd``, read beside it up to
    ``TOP_OUTPUT_MAX`` bytes and for ``TOP_TIMEOUT`` seconds (a guest decides what it
    sends: it must not fill the host); the third item says what cut it short."""
    r, w = os.pipe2(os.O_CLOEXEC)
    got = bytearray()
    too_much, too_late = threading.Event(), threading.Event()

    def drain() -> None:
        try:
            while chunk := os.read(r, 1 << 16):
                got.extend(chunk)
                if len(got) > TOP_OUTPUT_MAX:
                    too_much.set()
                    break
        finally:
            os.close(r)  # (the writer then fails with EPIPE, and hangs up)

    def hang_up() -> None:
        too_late.set()
        os.kill(os.getpid(), signal.SIGHUP)  # run_exec hangs up on it

    reader = threading.Thread(target=drain, name="ember-top", daemon=True)
    reader.start()
    timer = threading.Timer(TOP_TIMEOUT, hang_up)
    timer.start()
    code, cut = 0, None
    try:
        code = run(w)
    except BrokenPipeError:
        cut = f"it sent more than {TOP_OUTPUT_MAX >> 20} MiB"
    except SystemExit:
        if not too_late.is_set():
            raise
        cut = f"it did not answer within {TOP_TIMEOUT:.0f} s"
    finally:
        timer.cancel()
        os.close(w)
        reader.join()
    if too_much.is_set():
        cut = f"it sent more than {TOP_OUTPUT_MAX >> 20} MiB"
    return code, bytes(got), cut


@click.command("top")
@click.argument("machine")
def top(machine: str) -> None:
    """Show the processes running in MACHINE, as docker top does (UID PID PPID C STIME
    TTY TIME CMD; the guest's process ids), read in the guest by its ember-init."""
    from ember.cli.machines import find_machine
    from ember.machines.errors import MachineError
    from ember.machines.execclient import run_exec
    from ember.machines.execproto import ExecRequest
    from ember.machines.pause import refuse_if_paused
    from ember.machines.store import MachineStore

    home = home_from_ctx()
    st = find_machine(machine, home)
    d = MachineStore(home).dir(st.id)
    refuse_if_paused(d, st, "list the processes of")
    # ember-init's own binary, as a tool (it is PID 1's executable in every guest)
    request = ExecRequest(["/proc/1/exe", "--ps"], user="0", workdir="/")
    code, out, cut = _capture(lambda fd: run_exec(d, st, request, stdin_fd=None, out_fd=fd, err_fd=fd))
    if cut is not None:
        raise MachineError(f"cannot list the processes of machine {st.name}: {cut}")
    text = out.decode("utf-8", "replace")
    why = text.strip()[-2000:]  # (stderr: a failure's message)
    if code != 0:
        if "must run as PID 1" in why:
            raise MachineError(f"machine {st.name} runs an ember-init that predates ember top",
                               hint=f"restart it: ember restart {st.name}")  # fmt: skip
        raise MachineError(f"cannot list the processes of machine {st.name}: "
                           f"{printable(why) or f'exit code {code}'}")  # fmt: skip
    click.echo(top_table(parse_ps(text)), nl=False)


commands: list[click.Command] = [exec_, top]
