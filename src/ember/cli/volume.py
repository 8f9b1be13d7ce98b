"""``ember volume create/ls/inspect/rm``: disks that outlive machines (docs/volumes.md)."""

from __future__ import annotations

import datetime as _dt
import secrets

import click

from ember.cli import common
from ember.cli.common import home_from_ctx, json_option, print_json, say_error, warnings_as_messages
from ember.errors import EmberError
from ember.sizes import human_size


@click.group()
def volume() -> None:
    """Manage volumes: ext4 disks that outlive machines (ember run -v NAME:TARGET)."""
    warnings_as_messages()


@volume.command("create")
@click.argument("name", required=False)
@click.option("--size", help="File system size (e.g. 512M, 10G; default 1G).")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY[=VALUE]",
              help="Set a label on the volume (ember volume inspect shows them).")  # fmt: skip
def volume_create(name: str | None, size: str | None, labels: tuple[str, ...]) -> None:
    """Make an empty volume NAME (default: a generated name) and print its name; for a
    NAME that exists, print it (unless asked for with another --size or labels)."""
    from ember.machines.options import parse_labels
    from ember.sizes import parse_size
    from ember.volumes.store import Volumes

    wanted = None if size is None else parse_size(size)
    made = Volumes(home_from_ctx()).create(
        name or secrets.token_hex(32), wanted, labels=parse_labels(labels)
    )
    click.echo(made.name)


@volume.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only print volume names.")
@json_option
def volume_ls(quiet: bool, as_json: bool) -> None:
    """List volumes."""
    from ember.volumes.store import Volumes

    found = Volumes(home_from_ctx()).list()
    if as_json:
        print_json([v.to_json() for v in found])
    elif quiet:
        for v in found:
            click.echo(v.name)
    else:
        common.print_table(
            ("VOLUME NAME", "SIZE", "CREATED"),
            [(v.name, human_size(v.size), _when(v.created)) for v in found],
        )


def _when(created: float) -> str:
    age = _dt.datetime.now(tz=_dt.UTC).timestamp() - created
    return f"{common.human_duration(max(0.0, age))} ago"


@volume.command("inspect")
@click.argument("names", nargs=-1, required=True)
def volume_inspect(names: tuple[str, ...]) -> None:
    """Print volumes as a JSON array (the ones found; each one missing is an error)."""
    from ember.machines.lifecycle import volume_users
    from ember.volumes.store import Volumes

    home = home_from_ctx()
    volumes = Volumes(home)
    out, failed = [], 0
    for name in names:
        try:
            info = volumes.get(name)
        except EmberError as e:
            say_error(e)
            failed = e.exit_code
            continue
        out.append({**info.to_json(), "machines": volume_users(home, name)})
    print_json(out)
    if failed:
        raise SystemExit(failed)


@volume.command("rm")
@click.argument("names", nargs=-1, required=True)
def volume_rm(names: tuple[str, ...]) -> None:
    """Remove volumes and what they hold (refused while a machine uses one: remove the
    machine first).  Every name is tried; the exit status is not 0 if any failed."""
    from ember.machines.lifecycle import volume_users
    from ember.volumes.store import Volumes

    home = home_from_ctx()
    volumes = Volumes(home)
    common.each_named(names, lambda name: volumes.remove(name, lambda n: volume_users(home, n)))


commands: list[click.Command] = [volume]
