"""``ember volume create/ls/inspect/rm/prune``: disks that outlive machines (docs/volumes.md)."""

from __future__ import annotations

import datetime as _dt
import secrets
import sys
from typing import TYPE_CHECKING

import click

from ember.cli import common
from ember.cli.common import home_from_ctx, json_option, print_json, say_error, warnings_as_messages
from ember.errors import EmberError, UsageError
from ember.home import Home
from ember.sizes import human_size

if TYPE_CHECKING:
    from ember.volumes.listing import VolumeFilters


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
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="Only volumes that match: name (a regular expression), label=KEY[=VALUE], "
                   "dangling=true|false (used by no machine).  Repeat a key for any of its values.")  # fmt: skip
@json_option
def volume_ls(quiet: bool, filters: tuple[str, ...], as_json: bool) -> None:
    """List volumes."""
    from ember.volumes.listing import VolumeFilters
    from ember.volumes.store import Volumes

    home = home_from_ctx()
    wanted = VolumeFilters.parse(filters)
    found = Volumes(home).list()
    if wanted.dangling is not None:
        found = wanted.select(found, _in_use(home, "not sure which volumes are dangling"))
    else:
        found = wanted.select(found, ())
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


def _in_use(home: Home, unsure: str) -> set[str]:
    """The volumes machines' records name; a warning for each record that cannot be read."""
    from ember.machines.lifecycle import volumes_in_use

    used, damaged = volumes_in_use(home)
    for e in damaged:
        click.echo(f"ember: {e.message}: {unsure}", err=True)
    return used


@volume.command("rm")
@click.option("-f", "--force", is_flag=True, help="Say nothing of names that have no volume.")
@click.argument("names", nargs=-1, required=True)
def volume_rm(force: bool, names: tuple[str, ...]) -> None:
    """Remove volumes and what they hold (refused while a machine uses one: remove the
    machine first).  Every name is tried; the exit status is not 0 if any failed."""
    from ember.machines.lifecycle import volume_users
    from ember.volumes.errors import VolumeNotFound
    from ember.volumes.store import Volumes

    home = home_from_ctx()
    volumes = Volumes(home)

    def remove(name: str) -> None:
        try:
            volumes.remove(name, lambda n: volume_users(home, n))
        except VolumeNotFound:
            if not force:
                raise

    common.each_named(names, remove)


@volume.command("prune")
@click.option("-a", "--all", "prune_all", is_flag=True,
              help="Remove every volume no machine uses (without it: none, since ember's "
                   "volumes are all named).")  # fmt: skip
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("--filter", "filters", multiple=True, metavar="label=KEY[=VALUE]",
              help="Only volumes with these labels.")
def volume_prune(prune_all: bool, force: bool, filters: tuple[str, ...]) -> None:
    """Remove the volumes no machine uses, and what they hold (with --all)."""
    from ember.volumes.listing import PRUNE_KEYS, VolumeFilters

    home = home_from_ctx()
    wanted = VolumeFilters.parse(filters, PRUNE_KEYS)
    if not prune_all:
        # docker (23.0 on) prunes anonymous volumes unless --all; ember makes none
        click.echo(f"Total reclaimed space: {human_size(0)}")
        click.echo("ember: ember's volumes are all named: --all removes the ones no machine "
                   "uses", err=True)  # fmt: skip
        return
    if not force:
        if not sys.stdin.isatty():
            raise UsageError("volume prune --all removes data: add --force to run it without a terminal")
        if not click.confirm("WARNING! This will remove every volume no machine uses, and "
                             "the data in it.\nAre you sure you want to continue?"):  # fmt: skip
            return
    _prune(home, wanted)


def _prune(home: Home, wanted: VolumeFilters) -> None:
    from ember.machines.lifecycle import volume_users
    from ember.snapshots.errors import SnapshotNotFound
    from ember.snapshots.snapshotter import Snapshotter
    from ember.volumes.errors import VolumeInUse, VolumeNotFound
    from ember.volumes.store import Volumes, volume_key

    volumes = Volumes(home)
    chosen = wanted.select(volumes.list(), _in_use(home, "its volumes are kept"))
    snap = Snapshotter.existing(home)
    removed: list[str] = []
    freed = 0
    for v in chosen:
        try:
            usage = snap.usage(volume_key(v.name)).exclusive if snap is not None else 0
            volumes.remove(v.name, lambda n: volume_users(home, n))
        except (VolumeInUse, VolumeNotFound, SnapshotNotFound):
            continue  # a machine took it meanwhile, or it went: not this prune's
        removed.append(v.name)
        freed += usage
    if removed:
        click.echo("Deleted Volumes:")
        for name in removed:
            click.echo(name)
        click.echo()
    click.echo(f"Total reclaimed space: {human_size(freed)}")


commands: list[click.Command] = [volume]
