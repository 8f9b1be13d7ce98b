"""``ember snapshot ls/rm/leases``, ``ember gc`` and ``ember image prepare``."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import click

from ember.cli import common
from ember.cli.common import (
    home_from_ctx,
    json_option,
    print_json,
    say,
    say_error,
    warnings_as_messages,
)
from ember.cli.image import image as image_group
from ember.cli.image import plain_http_option, platform_option
from ember.sizes import human_size

if TYPE_CHECKING:
    from ember.snapshots import Snapshotter
    from ember.snapshots.model import SnapshotInfo


@click.group()
def snapshot() -> None:
    """Inspect and remove snapshots (ext4 disk images of layer chains and machine root disks)."""
    warnings_as_messages()


@snapshot.command("ls")
@json_option
def snapshot_ls(as_json: bool) -> None:
    """List snapshots with their parent, kind, file system size and disk usage."""
    from ember.snapshots import Snapshotter

    snap = Snapshotter.existing(home_from_ctx())  # None: no pool yet, nothing to list
    rows = [] if snap is None else [_row(snap, info) for info in snap.list()]
    if as_json:
        print_json(rows)
        return
    common.print_table(
        ("NAME", "KIND", "PARENT", "SIZE", "USAGE", "EXCLUSIVE"),
        [
            (
                _short(r["name"]), r["kind"], _short(r["parent"]) if r["parent"] else "-",
                human_size(r["size"]), human_size(r["usage"]), human_size(r["exclusive"]),
            )  # fmt: skip
            for r in rows
        ],
    )
    for r in rows:
        if r["damaged"]:  # on stderr: stdout keeps its format
            click.echo(
                f"ember: snapshot {r['name']} is damaged: {r['damaged']} (ember image prepare "
                "builds a layer again; ember snapshot rm removes it)",
                err=True,
            )


def _row(snap: Snapshotter, info: SnapshotInfo) -> dict[str, Any]:
    try:
        usage = snap.usage(info.name)
        used, exclusive = usage.size, usage.exclusive
    except OSError:
        used = exclusive = 0
    return {**info.to_json(), "usage": used, "exclusive": exclusive}


def _short(name: str) -> str:
    if name.startswith("sha256:") and len(name) == 71:
        return name[:19]
    return name


def _refuse_a_machines_disk(key: str) -> None:
    """A machine's root disk goes with its machine (`ember rm`), never under it: removed
    while the machine ran, its VMM wrote on into a deleted file, and the machine's next
    start failed for want of its disk."""
    from ember.machines.store import MachineStore
    from ember.snapshots.errors import SnapshotInUse

    machine_id = key.removeprefix("machine/")
    if machine_id != key and machine_id in MachineStore(home_from_ctx()).ids():
        raise SnapshotInUse(
            f"snapshot {key!r} is the root disk of machine {machine_id[:12]}",
            hint=f"ember rm {machine_id[:12]} removes the machine and its disk",
        )
    # (a volume's disk goes with `ember volume rm`, which checks no machine uses it)
    volume = key.removeprefix("volume/")
    if volume != key:
        raise SnapshotInUse(
            f"snapshot {key!r} is volume {volume}", hint=f"remove it with ember volume rm {volume}"
        )


@snapshot.command("rm", short_help="Remove snapshots.")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", "-f", is_flag=True,
              help="Remove snapshots that a lease holds too (a machine's root disk only "
              "once its machine is gone: ember rm removes both).")  # fmt: skip
def snapshot_rm(names: tuple[str, ...], force: bool) -> None:
    """Remove snapshots, named as `ember snapshot ls` shows them (a digest prefix that
    only one snapshot starts with is enough).

    A committed snapshot that another one has as its parent is refused, --force or not:
    remove the children first (named together, children go first), or let `ember gc`
    remove what no image needs.  A mounted snapshot is refused too.  One that a live
    lease holds (a machine's root disk, an image being prepared) is removed only with
    --force.  Every name is tried; each failure is reported, and the exit status is
    not 0 if any failed."""
    from ember.errors import EmberError
    from ember.snapshots import Snapshotter
    from ember.snapshots.errors import SnapshotNotFound

    snap = Snapshotter.existing(home_from_ctx())
    failures: list[EmberError] = []

    def failed(e: EmberError) -> None:
        say_error(e)
        failures.append(e)

    resolved: dict[str, str] = {}  # key -> the name it was given as
    for name in names:
        try:
            if snap is None:
                raise SnapshotNotFound(f"no snapshot {name!r}")
            resolved.setdefault(snap.resolve(name), name)
        except EmberError as e:
            failed(e)
    if snap is not None:
        for key in _children_first(snap, list(resolved)):
            try:
                _refuse_a_machines_disk(key)
                # (a wait for a running ember gc is said: it holds the lock leases take)
                snap.remove(key, respect_leases=not force, notice=say)
                click.echo(resolved[key])
            except EmberError as e:
                failed(e)
    if failures:
        raise SystemExit(failures[0].exit_code if len(failures) == 1 else 1)


def _children_first(snap: Snapshotter, keys: list[str]) -> list[str]:
    """``keys`` ordered so that a snapshot comes before its parent (and so before every
    ancestor), otherwise as given: ``rm PARENT CHILD`` then removes both."""
    if len(keys) < 2:
        return keys
    parents = {info.name: info.parent for info in snap.list()}

    def depth(key: str) -> int:
        d, seen = 0, {key}
        while (key := parents.get(key) or "") and key not in seen:
            seen.add(key)
            d += 1
        return d

    return sorted(keys, key=depth, reverse=True)


@snapshot.group("leases", invoke_without_command=True)
@json_option
@click.pass_context
def snapshot_leases(ctx: click.Context, as_json: bool) -> None:
    """List leases: what protects snapshots and content from gc, and until when
    (`ember snapshot leases rm NAME` removes one)."""
    if ctx.invoked_subcommand is None:
        _list_leases(as_json)


@snapshot_leases.command("ls")
@json_option
def leases_ls(as_json: bool) -> None:
    """List leases (the same as `ember snapshot leases`)."""
    _list_leases(as_json)


def _list_leases(as_json: bool) -> None:
    from ember.snapshots import Snapshotter

    snap = Snapshotter.existing(home_from_ctx())
    # a damaged lease file is shown, not fatal: this is where one is looked for, after
    # gc or image rm stopped on it
    leases, damaged = snap.leases.scan() if snap is not None else ([], [])
    now = time.time()
    if as_json:
        print_json(
            [{**lease.to_json(), "expired": lease.expired(now), "damaged": None} for lease in leases]
            + [{"name": d.name, "file": str(d.path), "damaged": d.error.message} for d in damaged]
        )
        return
    rows = [(d.name, "damaged", "-", "-") for d in damaged]
    for lease in leases:
        if lease.owner is not None and lease.orphaned():
            until = f"expired (its process {lease.owner.pid} is gone)"
        elif lease.expires is None:
            until = "never expires"
        elif lease.expired(now):
            until = "expired"
        else:
            until = f"expires in {lease.expires - now:.0f}s"
        rows.append((lease.name, until, str(len(lease.snapshots)), str(len(lease.content))))
    # a header even with no lease, as snapshot ls and image ls print theirs
    common.print_table(("NAME", "EXPIRES", "SNAPSHOTS", "BLOBS"), sorted(rows))
    for d in damaged:  # on stderr: stdout keeps its format
        say_error(d.error)


@snapshot_leases.command("rm", short_help="Remove leases.")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", "-f", is_flag=True,
              help="Remove a machine's lease (machine/ID) too.")  # fmt: skip
def leases_rm(names: tuple[str, ...], force: bool) -> None:
    """Remove leases (containerd's `ctr leases rm`): what they held is then left to gc.

    A machine's lease (`machine/ID`) keeps its root disk; it is removed only with
    --force (`ember rm ID` removes the machine, its disk and its lease)."""
    from ember.snapshots import Snapshotter
    from ember.snapshots.errors import LeaseError, LeaseNotFound

    snap = Snapshotter.existing(home_from_ctx())

    def remove(name: str) -> None:
        if snap is None:
            raise LeaseNotFound(f"no lease {name!r}")
        try:
            lease = snap.leases.get(name)
        except LeaseNotFound:
            raise
        except LeaseError:  # a damaged file: removing it is what was asked
            lease = None
        if lease and "machine" in lease.labels and not lease.expired() and not force:
            raise LeaseError(
                f"lease {name!r} keeps machine {lease.labels['machine']}'s root disk",
                hint=f"ember rm {lease.labels['machine']} removes the machine, or pass --force",
            )
        if lease and "volume" in lease.labels and not force:
            raise LeaseError(
                f"lease {name!r} is volume {lease.labels['volume']}'s",
                hint=f"ember volume rm {lease.labels['volume']} removes the volume, or pass "
                "--force (gc keeps a volume without it)",
            )
        if not snap.leases.delete(name):
            raise LeaseNotFound(f"no lease {name!r}")

    common.each_named(names, remove)


class _Seconds(click.ParamType):
    """A number of seconds, 0 or more and finite: click.FloatRange lets "nan" through
    (every comparison with it is false: a grace period that protects nothing)."""

    name = "seconds"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds < 0:
            self.fail(f"{value!r} is not a number of seconds (0 or more)", param, ctx)
        return seconds


SECONDS = _Seconds()


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option(
    "--content-grace",
    type=SECONDS,
    default=0.0,
    show_default=True,
    help="Keep unreferenced blobs younger than this many seconds.",
)
@click.option(
    "--ingest-grace",
    type=SECONDS,
    default=3600.0,
    show_default=True,
    help="Keep partial downloads no pull is writing for this many seconds (a pull resumes "
    "them); 0 frees them all.",
)
@click.option(
    "--templates-unused-for",
    type=SECONDS,
    help="Remove machine templates no machine started from for this many seconds "
    "(default: a week).",
)
@json_option
def gc(
    dry_run: bool,
    content_grace: float,
    ingest_grace: float,
    templates_unused_for: float | None,
    as_json: bool,
) -> None:
    """Remove snapshots, content and leases that no image and no live lease needs,
    machine templates nothing used for a while, and what killed commands left behind."""
    warnings_as_messages()
    from ember.snapshots.gc import collect

    report = collect(
        home_from_ctx(),
        dry_run=dry_run,
        content_grace=content_grace,
        ingest_grace=ingest_grace,
        templates_unused_for=templates_unused_for,
        notice=say,
    )
    if as_json:
        print_json(report.to_json())
        return
    for warning in report.warnings:
        say_error(warning)
    verb, freed = ("would remove", "would free") if dry_run else ("removed", "freed")
    click.echo(
        f"{verb} {len(report.snapshots)} snapshot(s), {len(report.content)} blob(s), "
        f"{len(report.leases)} expired lease(s), {report.ingests} partial download(s), "
        f"{len(report.templates)} machine template(s), {len(report.kernels)} unused kernel(s), "
        f"{report.machine_dirs} leftover machine dir(s), {report.temp_files} temp file(s), "
        f"{report.work_dirs} work dir(s) of killed runs, "
        f"{len(report.networks)} network(s) of removed machines; "
        f"{freed} {human_size(report.snapshot_bytes)} in the snapshot pool, "
        f"{human_size(report.content_bytes + report.ingest_bytes)} of content, "
        f"{human_size(report.template_bytes)} of templates, "
        f"{human_size(report.kernel_bytes)} of kernels and "
        f"{human_size(report.leftover_bytes)} of leftovers"
    )


@click.command("prepare")
@click.argument("ref")
@platform_option
@plain_http_option
@click.option("--json", "as_json", is_flag=True,
              help="Print {image, snapshot, path, seconds} as JSON instead of the summary and path.")  # fmt: skip
def prepare(ref: str, platform_text: str | None, plain_http: bool, as_json: bool) -> None:
    """Pull REF if needed and build its snapshot chain (one ext4 image per layer)."""
    warnings_as_messages()
    from ember.images import ImageService
    from ember.oci.platform import Platform
    from ember.snapshots.chain import prepare_image

    start = time.perf_counter()
    home = home_from_ctx()
    service = ImageService(home, notice=say)
    platform = Platform.parse(platform_text) if platform_text is not None else None
    # the chain's first layers are built while the last ones still download
    with service.ensuring(ref, platform, plain_http=plain_http) as pulled:
        img = pulled.image
        prepared = prepare_image(
            home, img, layer_path=pulled.layer_path, open_layer=pulled.open_layer
        )
    seconds = time.perf_counter() - start
    if as_json:
        print_json(
            {
                "image": prepared.manifest_digest,
                "snapshot": prepared.snapshot,
                "path": str(prepared.path),
                "seconds": round(seconds, 3),
            }
        )
        return
    built = len(prepared.built)
    # one plain line: click's echo, not rich's console (~10 ms to import)
    click.echo(
        f"built {built} of {len(img.layers)} layer snapshot(s) in {seconds:.2f}s"
        if built
        else f"all {len(img.layers)} layer snapshot(s) already built",
        err=True,
    )
    click.echo(str(prepared.path))


image_group.add_command(prepare)

commands: list[click.Command] = [snapshot, gc]
