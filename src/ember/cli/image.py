"""``ember image ...``: pull, list, inspect, tag, history, save, load, remove and unpack images."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ember.cli import common
from ember.cli.common import (
    ago,
    format_option,
    go_time,
    home_from_ctx,
    json_option,
    print_json,
    printable,
    say,
    say_error,
    warnings_as_messages,
)
from ember.errors import EmberError, UsageError
from ember.oci.platform import Platform
from ember.sizes import human_size

if TYPE_CHECKING:
    from ember.cli.goformat import Row, Schema, Template
    from ember.home import Home
    from ember.images import ImageService
    from ember.oci.digest import Digest
    from ember.oci.reference import Reference
    from ember.store.images import ImageRecord

platform_option = click.option(
    "--platform",
    "platform_text",
    metavar="OS/ARCH[/VARIANT]",
    help="Which image of a multi-platform index (default: this host's).",
)
plain_http_option = click.option(
    "--plain-http",
    is_flag=True,
    help="Talk plain HTTP to this registry (a loopback one is tried in plain HTTP first anyway).",
)


def _platform(text: str | None) -> Platform | None:
    return Platform.parse(text) if text is not None else None  # "" is a mistake, not "any"


def _service() -> ImageService:
    # Imported here: the image service pulls in the content store, sqlite3 and
    # the image sources, which every other ember command would otherwise pay
    # for at start-up.
    from ember.images import ImageService

    warnings_as_messages()  # e.g. a credential helper that fails: as ember: lines
    # a command that must wait for another's lock says so (one line) before it blocks
    return ImageService(home_from_ctx(), notice=say)


def _pinned(reference: str, digest: str) -> str:
    if reference.startswith(("oci:", "docker-archive:")):
        return digest
    return f"{reference.split('@', 1)[0]}@{digest}"


@click.group()
def image() -> None:
    """Manage images in the host's content store."""


@image.command()
@click.argument("ref")
@platform_option
@plain_http_option
@click.option(
    "-q", "--quiet", is_flag=True, help="Print only the pulled reference: no progress, no status line."
)
def pull(ref: str, platform_text: str | None, plain_http: bool, quiet: bool) -> None:
    """Pull REF: a registry reference, oci:DIR[:TAG] or docker-archive:FILE."""
    img = _service().pull(
        ref, _platform(platform_text), plain_http=plain_http, progress=False if quiet else None
    )
    count = len(img.layers)
    if not quiet:
        say(f"pulled {img.reference} ({img.platform}, {count} layer{'' if count == 1 else 's'})")
    if platform_text is None:
        from ember.oci.platform import host_platform

        host = host_platform()
        if not host.matches(img.platform):  # a single-platform image for another host
            say(f"warning: {img.reference} is for {img.platform}, not this host ({host}): "
                f"unpack and prepare need --platform {img.platform} to use it (ember run "
                "boots images for this host only)")  # fmt: skip
    # stdout: something to pin or inspect later (a digest reference for registry images)
    click.echo(_pinned(img.reference, str(img.manifest_digest)))


@image.command("ls")
@json_option
@click.option(
    "-q", "--quiet", is_flag=True,
    help="Print only image IDs (short manifest digests), each once: for ember image rm -f.",
)  # fmt: skip
@format_option
def list_images(as_json: bool, quiet: bool, format_text: str | None) -> None:
    """List local images.

    --format takes docker image ls's template fields: .ID (the short manifest digest,
    as -q prints it) .Repository .Tag .Digest .CreatedSince .CreatedAt (when the image
    was built, from its config) .Size.  A template wins over -q, as docker's."""
    # The image table alone (all that ImageService.list reads): the service's pull
    # machinery (parsers, sources, content store: ~15 ms of imports) is not needed.
    from ember.store.images import ImageTable, open_image_db

    if as_json and quiet:
        raise UsageError("--json and --quiet cannot be used together")
    template = None
    if format_text:
        from ember.cli.goformat import from_options

        template = from_options(format_text, as_json, _image_schema())
    home = home_from_ctx()
    records = ImageTable(open_image_db(home.db_path)).list()
    if as_json:
        print_json([r.as_dict() for r in records])
        return
    if template is not None:
        click.echo(template.render(_image_rows(home, records, template)), nl=False)
        return
    if quiet:
        for image_id in dict.fromkeys(r.manifest_digest.short for r in records):
            click.echo(image_id)
        return
    header = ("REFERENCE", "DIGEST", "PLATFORM", "SIZE", "PULLED")
    rows = [
        (
            r.reference,
            r.manifest_digest.short,
            r.platform,
            human_size(r.size, decimal=True),
            ago(r.updated_at),
        )
        for r in records
    ]
    common.print_table(header, rows)


def _image_schema() -> Schema:
    from ember.cli.goformat import Schema

    return Schema(
        "ember image ls",
        {"ID": "IMAGE ID", "Repository": "REPOSITORY", "Tag": "TAG", "Digest": "DIGEST",
         "CreatedSince": "CREATED", "CreatedAt": "CREATED AT", "Size": "SIZE"},
        missing={
            "Containers": "ember does not count the machines of an image",
            "SharedSize": "ember does not measure what images share",
            "UniqueSize": "ember does not measure what images share",
            "VirtualSize": "docker's deprecated name of .Size",
        },
    )  # fmt: skip


def _image_rows(home: Home, records: list[ImageRecord], template: Template) -> list[Row]:
    """Each record's values of the fields ``template`` uses; an image's creation time
    (in its config blob) is only read when asked for."""
    from ember.cli.goformat import Row

    built: dict[str, str | None] = {}  # config digest -> its "created"
    rows = []
    for r in records:
        repository, tag = _repository_and_tag(r.reference)
        values = {
            "ID": r.manifest_digest.short,
            "Repository": repository,
            "Tag": tag,
            "Digest": str(r.manifest_digest),
            "Size": human_size(r.size, decimal=True),
        }
        if template.fields & {"CreatedAt", "CreatedSince"}:
            key = str(r.config_digest)
            if key not in built:
                built[key] = _created(home, r.config_digest)
            values["CreatedAt"] = go_time(built[key])
            values["CreatedSince"] = ago(built[key])
        rows.append(Row(values))
    return rows


def _repository_and_tag(reference: str) -> tuple[str, str]:
    """docker's REPOSITORY and TAG of a local name: the familiar name (``debian``,
    ``registry:5000/team/web``) and its tag, ``<none>`` for a name without one (a
    ``NAME@DIGEST``); a local source's name (``oci:DIR:TAG``) split at its last ':'."""
    from dataclasses import replace

    from ember.oci.errors import FormatError
    from ember.oci.reference import Reference

    try:
        ref = Reference.parse(reference)
    except FormatError:
        name, colon, tag = reference.rpartition(":")
        if not colon or "/" in tag:
            return reference, "<none>"
        return name, tag
    return replace(ref, tag=None, digest=None).familiar(), ref.tag or "<none>"


def _created(home: Home, config_digest: Digest) -> str | None:
    """The image's build time as its config says it (docker's image ``Created``); None
    when the config does not say, or cannot be read (a listing shows what it can)."""
    from ember import jsonutil
    from ember.store.content import ContentStore

    try:
        config = jsonutil.loads(ContentStore(home.content).read_bytes(config_digest))
    except (EmberError, OSError, ValueError):
        return None
    created = config.get("created") if isinstance(config, dict) else None
    return created if isinstance(created, str) else None


#: CREATED BY is cut to this many characters, as docker history cuts it (--no-trunc: whole)
CREATED_BY_WIDTH = 45


def _one_line(text: str, width: int | None) -> str:
    line = " ".join(text.split())  # a Dockerfile RUN with newlines and tabs: one row
    if width is not None and len(line) > width:
        return line[: width - 1] + "…"
    return line


@image.command()
@click.argument("ref")
@json_option
@click.option("--no-trunc", is_flag=True, help="Do not cut CREATED BY.")
def history(ref: str, as_json: bool, no_trunc: bool) -> None:
    """Show how REF was built: its config's history, newest step first, with the layer
    each step made (SIZE is the layer's compressed size), as docker history."""
    img = _service().get(ref)
    steps = list(reversed(img.history()))
    if as_json:
        print_json([
            {
                **(entry.as_dict() if entry is not None else {}),
                "layer": str(layer.digest) if layer is not None else None,
                "size": layer.size if layer is not None else 0,
            }
            for entry, layer in steps
        ])  # fmt: skip
        return
    width = None if no_trunc else CREATED_BY_WIDTH
    header = ("LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT")
    rows = [
        (
            (str(layer.digest) if no_trunc else layer.digest.short) if layer is not None else "-",
            ago(entry.created) if entry is not None else "",
            _one_line(entry.created_by or "", width) if entry is not None else "",
            human_size(layer.size if layer is not None else 0, decimal=True),
            _one_line(entry.comment or "", None) if entry is not None else "",
        )
        for entry, layer in steps
    ]
    common.print_table(header, rows)


def _saved_as(given: str, recorded: str) -> Reference | None:
    """The name an image given as ``given`` goes into an archive under, as docker save
    names it: the name as given (``NAME@DIGEST`` too, which then gets no tag); none for
    an image given by ID, whichever names it has here."""
    from ember.images.sources import parse_source
    from ember.oci.errors import FormatError

    try:
        ref = parse_source(given).reference
    except (FormatError, EmberError):
        return None
    if ref is None or (ref.digest is None and str(ref) != recorded):
        return None  # a local source's name, or an ID that also reads as a name
    return ref


@image.command()
@click.argument("refs", metavar="REF...", nargs=-1, required=True)
@click.option(
    "-o", "--output", "output_text", metavar="FILE",
    help="Write to FILE (whole or not at all) instead of standard output.",
)  # fmt: skip
def save(refs: tuple[str, ...], output_text: str | None) -> None:
    """Write images (names or IDs) to one tar archive, as docker save.

    docker load, podman load, skopeo (docker-archive:, oci-archive:) and ember
    image pull docker-archive:FILE read it; unpacked, it is an OCI layout (oci:DIR)."""
    from ember.images.save import SavedImage, write_archive, write_archive_file

    if output_text is None and sys.stdout.isatty():
        raise UsageError(
            "refusing to write an archive to a terminal: give -o FILE or redirect the output"
        )
    if output_text == "":
        raise UsageError("-o needs a file name")
    service = _service()
    with service.holding(refs) as images:
        saved = [SavedImage(img, _saved_as(ref, img.reference)) for ref, img in zip(refs, images, strict=True)]
        if output_text is None:
            write_archive(saved, service.content, sys.stdout.buffer, check_first=True)
            sys.stdout.buffer.flush()
            return
        path = Path(output_text)
        if path.is_dir():
            raise UsageError(f"{output_text} is a directory: -o takes the archive's file name")
        try:
            write_archive_file(saved, service.content, path)
        except OSError as e:
            raise EmberError(f"cannot write {output_text}: {e.strerror or e}") from None


@image.command()
@click.option(
    "-i", "--input", "input_text", metavar="FILE",
    help="Read the archive from FILE instead of standard input.",
)  # fmt: skip
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
def load(input_text: str | None, quiet: bool) -> None:
    """Load the images of a docker save archive (ember image save, docker save, podman
    save) under the names it gives them, as docker load.

    Prints each name as its image is loaded.  A compressed archive (gzip, bzip2, xz,
    zstd), standard input or a pipe is first copied, decompressed, to an unnamed file
    beside the store (the archive is read in place, by offsets)."""
    import stat

    from ember.images.dockerarchive import compression_of
    from ember.images.spool import spool

    service = _service()
    with contextlib.ExitStack() as stack:
        if input_text is None:
            if sys.stdin.isatty():
                raise UsageError("requested load from standard input, but it is a terminal: "
                                 "give -i FILE or redirect the archive in")  # fmt: skip
            stream, label = sys.stdin.buffer, "standard input"
        else:
            if input_text == "":
                raise UsageError("-i needs a file name")
            try:
                stream = stack.enter_context(open(input_text, "rb"))  # noqa: SIM115
            except OSError as e:
                raise EmberError(f"cannot read {input_text}: {e.strerror or e}") from None
            label = input_text
        # the first bytes, left in the stream (a pipe cannot seek back)
        head = stream.peek(8)[:8] if isinstance(stream, io.BufferedReader) else b""
        named_at: Path | None = None
        if stat.S_ISREG(os.fstat(stream.fileno()).st_mode) and compression_of(head) is None:
            # read in place (an untagged image is then named after the file given)
            path = Path(f"/proc/self/fd/{stream.fileno()}")
            if input_text is not None:
                named_at = Path(os.path.abspath(input_text))
        else:
            spooled = stack.enter_context(spool(stream, service.home.content, label))
            path = Path(f"/proc/self/fd/{spooled.fileno()}")
        for loaded in service.load(path, label=label, named_at=named_at,
                                   progress=False if quiet else None):  # fmt: skip
            for tag, why in loaded.skipped:
                say(f"warning: RepoTag {printable(tag[:200])!r} not used: {why}")
            for name, old in loaded.moved:
                say(f"{name} moved from image {old.short} to {loaded.image.manifest_digest.short}")
            for name in loaded.names:
                click.echo(f"Loaded image: {name}")
                sys.stdout.flush()  # as it goes, also into a pipe


@image.command()
@click.argument("source")
@click.argument("target")
def tag(source: str, target: str) -> None:
    """Name the local image SOURCE (a name or ID) also TARGET (NAME[:TAG]), as docker tag."""
    _service().tag(source, target)


@image.command()
@click.argument("refs", nargs=-1, required=True)
def inspect(refs: tuple[str, ...]) -> None:
    """Print images' manifest digests, platforms, configs and layers as a JSON array.

    As docker image inspect: the images found are printed, each other REF is
    reported, and the exit status is then 1."""
    service = _service()
    found, failed = [], False
    for ref in refs:
        try:
            found.append(service.get(ref).as_dict())
        except EmberError as e:
            say_error(e)
            failed = True
    print_json(found)
    if failed:
        raise SystemExit(1)


@image.command("rm")
@click.argument("refs", nargs=-1, required=True)
@click.option(
    "-f", "--force", is_flag=True,
    help="Remove every name of an image given by digest (or ID), not only one.",
)  # fmt: skip
def remove(refs: tuple[str, ...], force: bool) -> None:
    """Remove images (and the blobs no other image uses).

    Each REF is tried in turn, as docker rmi does: one that cannot be removed is
    reported and the others are still removed; the exit status is then non-zero."""
    service = _service()
    failed: list[tuple[str, EmberError]] = []
    for ref in refs:
        try:
            names = service.remove(ref, force=force)
        except EmberError as e:
            if len(refs) == 1:
                raise
            say_error(e)
            failed.append((ref, e))
            continue
        for name in names:  # on stdout, docker rmi's words: what scripts read
            click.echo(f"Untagged: {name}")
    if failed:
        listing = ", ".join(ref for ref, _ in failed)
        error = EmberError(f"{len(failed)} of {len(refs)} images not removed: {listing}")
        error.exit_code = max(e.exit_code for _, e in failed)
        raise error


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
    created: Path | None = None  # the topmost directory this command made
    if directory.is_symlink():
        # a name someone else linked beforehand (in /tmp, say) would send the image's
        # root owner, modes and device nodes wherever the link points
        raise UsageError(
            f"{directory} is a symbolic link: name the directory itself (unpack does not follow it)"
        )
    if directory.exists():
        if not directory.is_dir():
            raise UsageError(f"{directory} exists and is not a directory")
        if any(os.scandir(directory)):
            raise UsageError(f"{directory} is not empty: unpack needs an empty or new directory")
    else:
        created = _first_missing(directory)
        directory.mkdir(parents=True)
    # what a failure removes or empties again, and not a directory put in its place
    made = os.lstat(created) if created is not None else None
    checked = os.lstat(directory)
    applying = False
    service = _service()
    try:
        # layers are applied as they arrive, while the later ones still download
        with service.ensuring(ref, _platform(platform_text), plain_http=plain_http) as pulled:
            img = pulled.image
            try:
                applying = True
                stats = apply_layers(
                    directory,
                    [(service.layer_path(x), x.media_type, x.diff_id) for x in img.layers],
                    opener=pulled.open_layer,
                )
            except (InvalidLayer, DiffIDMismatch) as e:
                service.content.raise_if_damaged([x.digest for x in img.layers], e)
                raise
    except BaseException:
        from ember.fsutil import empty_directory, remove_tree

        # What a failed unpack wrote goes: parts of layers, or of a blob that then failed
        # its digest (layers are applied as their bytes arrive).  Not shutil.rmtree: the
        # layers may have built a tree deeper than its recursion; the parents this made
        # too (``new/a`` of ``new/a/b``), none that existed before; a directory that
        # existed (empty, checked above) is emptied, once layers were applied to it.
        try:
            if created is not None:
                remove_tree(created, expect=made)
            elif applying:
                empty_directory(directory, expect=checked)
        except OSError as e:
            say(f"warning: could not remove what the failed unpack wrote in {directory}: "
                f"{e.strerror or e}")  # fmt: skip
        raise
    layers = f"{stats.layers} layer{'' if stats.layers == 1 else 's'}"
    say(f"unpacked {img.reference} into {directory} ({layers}, {stats.entries} entries)")


def _first_missing(directory: Path) -> Path:
    """The topmost of ``directory`` and its parents that does not exist (what ``mkdir -p``
    creates first)."""
    path = directory
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


commands: list[click.Command] = [image]
