"""The ``ember`` entry point: builds the command tree and turns errors into one line."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from ember import __version__
from ember.errors import EmberError
from ember.home import Home

# Each module exposes ``commands: list[click.Command]`` (groups or plain commands).
COMMAND_MODULES = [
    "ember.cli.image",
    "ember.cli.snapshot",
    "ember.cli.registry",
    "ember.cli.server",
    "ember.cli.admin",
    "ember.cli.kernel",
    "ember.cli.run",
    "ember.cli.machines",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ember")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EMBER_HOME",
    help="State directory (default: /var/lib/ember as root, else ~/.local/share/ember).",
)
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """ember runs OCI images as micro-VMs."""
    ctx.obj = {"home": Home(home.absolute()) if home else None}


for _name in COMMAND_MODULES:
    for _cmd in importlib.import_module(_name).commands:
        cli.add_command(_cmd)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="ember", standalone_mode=False)
    except EmberError as e:
        click.echo(f"ember: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("ember: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("ember: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(141)
