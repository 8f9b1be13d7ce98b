"""``ember exec``: run a command in a running machine, beside its program (docker exec)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ember.cli.common import home_from_ctx


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


commands: list[click.Command] = [exec_]
