"""The ``ember`` entry point: builds the command tree and turns errors into one line."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from typing import Any

import click

from ember import __version__
from ember.errors import EmberError

# Which module defines each top-level command.  Modules are imported only when
# their command runs, so that `ember image ls` does not pay for the registry
# server's imports.  Each module exposes ``commands: list[click.Command]``.
# The snapshot module also adds ``prepare`` to the ``image`` group.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "image": ("ember.cli.image", "ember.cli.snapshot"),
    "snapshot": ("ember.cli.snapshot",),
    "gc": ("ember.cli.snapshot",),
    "registry": ("ember.cli.registry",),
    "server": ("ember.cli.server",),
    "admin": ("ember.cli.admin",),
    "kernel": ("ember.cli.kernel",),
    "run": ("ember.cli.run",),
    "start": ("ember.cli.run",),
    "restart": ("ember.cli.run",),
    "attach": ("ember.cli.run",),
    "ps": ("ember.cli.machines",),
    "logs": ("ember.cli.machines",),
    "stop": ("ember.cli.machines",),
    "kill": ("ember.cli.machines",),
    "rm": ("ember.cli.machines",),
    "inspect": ("ember.cli.machines",),
    "port": ("ember.cli.machines",),
    "rename": ("ember.cli.machines",),
    "wait": ("ember.cli.machines",),
    "pause": ("ember.cli.machines",),
    "unpause": ("ember.cli.machines",),
    "stats": ("ember.cli.stats",),
    "exec": ("ember.cli.execcmd",),
    "top": ("ember.cli.execcmd",),
    "agent": ("ember.cli.agent",),
    "volume": ("ember.cli.volume",),
}


class _Interrupted(BaseException):
    """A KeyboardInterrupt (or Terminated) out of a command, past click: click would
    print an empty line before turning it into Abort, a stray blank line in a log."""


class _PipeClosed(BaseException):
    """Whoever read our output went away (``ember ... | head -1``), out of a command past
    click, which would make any EPIPE exit status 1."""


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted(e) from e
        except BrokenPipeError as e:
            raise _PipeClosed from e

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        modules = COMMAND_MODULES.get(cmd_name)
        if modules is None:
            return None
        loaded = [importlib.import_module(name) for name in modules]
        for cmd in loaded[0].commands:
            if cmd.name == cmd_name:
                return cmd
        raise RuntimeError(f"{modules[0]} does not define the command {cmd_name!r}")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ember")
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    envvar="EMBER_HOME",
    help="State directory (default: /var/lib/ember as root, else ~/.local/share/ember).",
)
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """ember runs OCI images as micro-VMs."""
    # Imported here, not above: pathlib and dataclasses (~4 ms) are not needed for
    # `ember --version` or `--help`, which exit before this callback runs.
    from pathlib import Path

    from ember.home import Home

    # "~" as the client and the default home read EMBER_HOME (homedir.py): the shell
    # leaves it alone in EMBER_HOME='~/x' and in --home=~/x
    if home == "" and ctx.get_parameter_source("home") == click.core.ParameterSource.COMMANDLINE:
        # a script's `--home "$DIR"` with DIR unset would act on the host's own state
        # directory (an empty EMBER_HOME keeps meaning the default, as an unset one)
        raise click.BadParameter("is empty", param_hint="--home")
    ctx.obj = {"home": Home(Path(home).expanduser().absolute()) if home else None}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``kill``, a service manager), raised in the main thread
    as Ctrl-C is, so that what an interrupted command cleans up (mounts, loop
    devices, leases, half-built snapshots) it cleans up on SIGTERM too."""


class HungUp(Terminated):
    """SIGHUP: the terminal closed, an ssh session dropped, or the ember client that a
    command runs for in the agent went away; the command stops and cleans up as on
    SIGTERM (it died with a machine half made, its network allocated)."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise HungUp if signum == signal.SIGHUP else Terminated


def _cause(e: BaseException) -> BaseException | None:
    """What ``e`` stands for: click turns an interrupt at a prompt into ``Abort() from
    None``, which keeps the interrupt as the context, not the cause."""
    return e.__cause__ or e.__context__


def main(argv: list[str] | None = None) -> None:
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            # Started with that descriptor closed (>&-): /dev/null takes its number, which
            # a file opened later (the database) would otherwise get, and print() write to
            setattr(sys, name, open(os.devnull, mode))  # noqa: SIM115 (for the process's life)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        # not if our caller set its own, or ignores it (nohup)
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _raise_terminated)
    try:
        cli.main(args=argv, prog_name="ember", standalone_mode=False)
    except EmberError as e:
        with contextlib.suppress(OSError):  # stderr itself may be what failed (2>/dev/full)
            click.echo(f"ember: {_bounded(str(e))}", err=True)
        sys.exit(e.exit_code)
    except (_Interrupted, click.exceptions.Abort, KeyboardInterrupt) as e:
        # click turns an interrupt while parsing (a prompt) into Abort (its cause)
        if sys.stderr.isatty():
            click.echo(err=True)  # after the terminal's ^C
        if isinstance(e, HungUp) or isinstance(_cause(e), HungUp):
            click.echo("ember: hung up", err=True)
            sys.exit(129)
        if isinstance(e, Terminated) or isinstance(_cause(e), Terminated):
            click.echo("ember: terminated", err=True)
            sys.exit(143)
        click.echo("ember: interrupted", err=True)
        sys.exit(130)
    except _NoArgsIsHelp as e:
        # `ember`, `ember image` alone: their help, as it is written (the line below
        # made it one line of escaped newlines), on stdout with status 0, as docker's
        click.echo(e.ctx.get_help())
        sys.exit(0)
    except click.UsageError as e:
        # one line, as every other error (click's own is usage, a hint and the error)
        where = e.ctx.command_path if e.ctx is not None else "ember"
        click.echo(f"ember: {_bounded(e.format_message())} (see: {where} --help)", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (_PipeClosed, BrokenPipeError):
        # as a program killed by SIGPIPE, quietly; what is left in stdout's buffer goes
        # nowhere (flushed at exit, it would fail again)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as e:
        # The host refused something the command needed (a permission, a path that
        # is a file, a full disk): one line naming it, as for an ember error.  Other
        # exceptions stay tracebacks: those are ember's bugs.
        click.echo(f"ember: {_bounded(describe_os_error(e))}", err=True)
        sys.exit(1)


#: click 8.2+ raises it for a group given no command (8.1 printed the help itself)
_NoArgsIsHelp: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())

def _bounded(message: str) -> str:
    from ember.cli.common import bounded  # on the error path only: it loads ember.home

    return bounded(message)


def describe_os_error(e: OSError) -> str:
    """``strerror: path`` (``-> other`` for two-path calls), as the shell's tools say it."""
    text = e.strerror or str(e)
    if e.filename is not None:
        text += f": {os.fsdecode(e.filename)}"
    if e.filename2 is not None:
        text += f" -> {os.fsdecode(e.filename2)}"
    return text


if __name__ == "__main__":  # `python -m ember.cli.main ...`, e.g. under -X importtime
    main()
