"""``ember image ...``: pull, list, inspect, remove and unpack images."""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ember.cli import common
from ember.cli.common import home_from_ctx, json_option, print_json
from ember.errors import UsageError
from ember.oci.platform import Platform

if TYPE_CHECKING:
    from ember.images import ImageService

platform_option = click.option(
    "--platform",
    "platform_text",
    metavar="OS/ARCH[/VARIANT]",
    help="Which image of a multi-platform index (default: this host's).",
)
plain_http_option = click.option(
    "--plain-http",
    is_flag=True,
    help="Talk plain HTTP to this registry (loopback registries always do).",
)


def _platform(text: str | None) -> Platform | None:
    return Platform.parse(text) if text is not None else None  # "" is a mistake, not "any"


def _service() -> ImageService:
    # Imported here: the image service pulls in the content store, sqlite3 and
    # the image sources, which every other ember command would otherwise pay
    # for at start-up.
    from ember.images import ImageService

    return ImageService(home_from_ctx())


def _say(text: str) -> None:
    """A status line on stderr (never wrapped: paths and digests stay whole)."""
    click.echo(text, err=True)


def _pinned(reference: str, digest: str) -> str:
    if reference.startswith(("oci:", "docker-archive:")):
        return digest
    return f"{reference.split('@', 1)[0]}@{digest}"


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _age(when: datetime) -> str:
    seconds = int((datetime.now(UTC) - when).total_seconds())
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = seconds // length
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


@click.group()
def image() -> None:
    """Manage images in the host's content store."""


@image.command()
@click.argument("ref")
@platform_option
@plain_http_option
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
def pull(ref: str, platform_text: str | None, plain_http: bool, quiet: bool) -> None:
    """Pull REF: a registry reference, oci:DIR[:TAG] or docker-archive:FILE."""
    img = _service().pull(
        ref, _platform(platform_text), plain_http=plain_http, progress=False if quiet else None
    )
    count = len(img.layers)
    _say(f"pulled {img.reference} ({img.platform}, {count} layer{'' if count == 1 else 's'})")
    # stdout: something to pin or inspect later (a digest reference for registry images)
    click.echo(_pinned(img.reference, str(img.manifest_digest)))


@image.command("ls")
@json_option
def list_images(as_json: bool) -> None:
    """List local images."""
    # The image table alone (all that ImageService.list reads): the service's pull
    # machinery (parsers, sources, content store: ~15 ms of imports) is not needed.
    from ember.store.images import ImageTable, open_image_db

    records = ImageTable(open_image_db(home_from_ctx().db_path)).list()
    if as_json:
        print_json([r.as_dict() for r in records])
        return
    common.print_table(
        ("REFERENCE", "DIGEST", "PLATFORM", "SIZE", "PULLED"),
        [
            (
                r.reference,
                r.manifest_digest.short,
                r.platform,
                _human_size(r.size),
                _age(r.updated_at),
            )
            for r in records
        ],
    )


@image.command()
@click.argument("ref")
def inspect(ref: str) -> None:
    """Print an image's manifest digest, platform, config and layers as JSON."""
    print_json(_service().get(ref).as_dict())


@image.command("rm")
@click.argument("refs", nargs=-1, required=True)
def remove(refs: tuple[str, ...]) -> None:
    """Remove images (and the blobs no other image uses)."""
    service = _service()
    for ref in refs:
        service.remove(ref)
        _say(f"removed {ref}")


@image.command()
@click.argument("ref")
@click.argument("directory_text", metavar="DIRECTORY")
@platform_option
@plain_http_option
def unpack(ref: str, directory_text: str, platform_text: str | None, plain_http: bool) -> None:
    """Write the flattened root file system of REF into DIRECTORY (empty or new)."""
    from ember.unpack import DiffIDMismatch, InvalidLayer, apply_layers

    if not directory_text:  # Path("") is ".": an empty argument would unpack here
        raise UsageError("DIRECTORY is empty: name the directory to unpack into")
    directory = Path(directory_text)
    created = False
    if directory.exists():
        if not directory.is_dir():
            raise UsageError(f"{directory} exists and is not a directory")
        if any(os.scandir(directory)):
            raise UsageError(f"{directory} is not empty: unpack needs an empty or new directory")
    else:
        directory.mkdir(parents=True)
        created = True
    service = _service()
    try:
        # layers are applied as they arrive, while the later ones still download
        with service.ensuring(ref, _platform(platform_text), plain_http=plain_http) as pulled:
            img = pulled.image
            try:
                stats = apply_layers(
                    directory,
                    [(service.layer_path(x), x.media_type, x.diff_id) for x in img.layers],
                    wait=pulled.layer_path,
                )
            except (InvalidLayer, DiffIDMismatch) as e:
                service.content.raise_if_damaged([x.digest for x in img.layers], e)
                raise
    except BaseException:
        if created:
            from ember.fsutil import remove_tree

            # not shutil.rmtree: the layers may have built a tree deeper than its recursion
            with contextlib.suppress(OSError):
                remove_tree(directory)
        raise
    layers = f"{stats.layers} layer{'' if stats.layers == 1 else 's'}"
    _say(f"unpacked {img.reference} into {directory} ({layers}, {stats.entries} entries)")


commands: list[click.Command] = [image]
