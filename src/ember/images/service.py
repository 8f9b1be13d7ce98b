"""The host image service: pull images into the content store, name them, hand them out.

A pull resolves the source to one image manifest, checks its layer types,
downloads config and layers at once through the verifying content-store writer
with bounded concurrency, validates the config meanwhile (one DiffID per
layer, the platform asked for), stores the manifest blob last, makes the blob
names durable (one directory fsync) and then records the reference.  Readers
therefore never see a reference whose blobs are missing.

Pulls hold ``images.lock`` shared (``ember gc`` takes it exclusively), and claim
the blobs they rely on, which ``remove`` spares (``ember.images.locking``): a
removal never deletes a blob that a concurrent pull is about to record, and
it does not wait for pulls.

``pulling``/``ensuring`` hand the image out as soon as its config is checked,
while the layers still download: whoever applies the layers asks
``Pulling.layer_path(i)``, which waits for that one verified blob (a snapshot
chain), so applying layer 1 overlaps downloading layers 2..n, or
``Pulling.open_layer(i)``, which reads it from its first byte as it arrives,
unverified until its end (``ember image unpack``; see ``downloads``).
The image is recorded as soon as everything is fetched, in a thread beside the
caller's work; a caller that fails before then abandons the pull and nothing is
recorded.

A pull that stops (Ctrl-C, a refused config, the caller's error) cancels its
downloads, the running ones too (``ember.images.cancel``), and returns without
waiting for them beyond a short grace: a download blocked where it cannot be
woken (a registry that never answers a request) ends on its own timeout, in a
daemon thread, and records nothing.
"""

from __future__ import annotations

import builtins
import io
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ember.home import Home
from ember.images.downloads import BlobRestarted, Download, Downloads
from ember.images.errors import AmbiguousImage, ImageNotFound, InvalidImage, InvalidSource
from ember.images.locking import Claims, images_lock
from ember.images.model import Image, Layer
from ember.images.ocilayout import OciLayoutSource
from ember.images.progress import PullProgress, make_progress
from ember.images.sources import Resolved, Source, SourceSpec, name_for_tag, parse_source
from ember.locks import FileLock, Notice
from ember.oci import mediatypes as mt
from ember.oci.chainid import chain_ids
from ember.oci.config import MAX_CONFIG_SIZE, ImageConfig, parse_config
from ember.oci.digest import Digest
from ember.oci.errors import FormatError, InvalidReference, NoMatchingPlatform
from ember.oci.manifest import Descriptor, ImageManifest, parse_manifest
from ember.oci.platform import Platform, host_platform
from ember.registry.client.credentials import CredentialStore
from ember.store.content import ContentStore
from ember.store.errors import BlobNotFound, DamagedBlob, DamagedImageRecord
from ember.store.images import ImageRecord, ImageTable, open_image_db

#: blobs downloaded at once, as skopeo does (with a distant registry, a 5-layer image at 4
#: at a time took two round trips: 1.13x -> 0.60x of skopeo copy at 30 ms per blob)
MAX_PARALLEL_BLOBS = 6
#: layers an image may have.  Each is a snapshot of its own on every host that runs
#: it (a clone, a mount, an apply, a commit: ~15 ms and a disk image in the pool), so
#: an image of 10,000 empty layers (what a manifest may list) cost minutes and pool
#: space before its first boot.  Docker's overlay2 refuses images deeper than 125.
MAX_LAYERS = 128
#: seconds a stopping pull waits for its cancelled downloads to let go (an aborted read
#: ends at once; this only bounds the wait for one blocked where it cannot be woken)
CANCEL_GRACE = 2.0
_HEX_PREFIX = re.compile(r"^(?:sha256:)?[0-9a-f]{6,64}$")
_FULL_ID = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Loaded:
    """An image ``load`` recorded: under ``names``; the RepoTags it could not use, each
    with why (``skipped``); names it took from another image (name, that image's ID)."""

    image: Image
    names: builtins.list[str]
    skipped: builtins.list[tuple[str, str]]
    moved: builtins.list[tuple[str, Digest]]


#: RepoTags of one image that load records at most (an archive could name it millions)
MAX_LOAD_NAMES = 1000


def _load_names(tags: builtins.list[str]) -> tuple[builtins.list[str], builtins.list[tuple[str, str]]]:
    """An archive image's RepoTags as names to record it under (normalised, each once),
    and those that cannot be, each with why: what ``image tag`` would refuse."""
    names: dict[str, None] = {}
    skipped: builtins.list[tuple[str, str]] = []
    for tag in tags:
        if len(names) >= MAX_LOAD_NAMES:
            skipped.append((tag, f"more than {MAX_LOAD_NAMES} names for one image"))
            continue
        try:
            names[str(name_for_tag(tag))] = None
        except (FormatError, InvalidSource) as e:
            skipped.append((tag, e.message))
    return list(names), skipped


def _repository_of(name: str) -> str | None:
    """``registry/repository`` of a recorded registry name (None for a local source's)."""
    try:
        ref = parse_source(name).reference
    except (FormatError, InvalidSource):
        return None
    return ref.name if ref is not None else None


def build_image(
    reference: str,
    manifest_digest: Digest,
    manifest: ImageManifest,
    config_digest: Digest,
    config: ImageConfig,
    *,
    manifest_size: int = 0,
) -> Image:
    """Check that manifest and config make an image ember can unpack, and describe it."""
    check_layer_count(reference, manifest)
    if manifest.config.media_type not in mt.CONFIG_TYPES:
        raise InvalidImage(
            f"{reference} is not a container image (its config has media type {manifest.config.media_type[:120]!r})"
        )
    if len(manifest.layers) != len(config.diff_ids):
        raise InvalidImage(
            f"{reference}: the manifest has {len(manifest.layers)} layers but the config lists "
            f"{len(config.diff_ids)} DiffIDs"
        )
    for desc in manifest.layers:
        mt.layer_compression(desc.media_type)  # raises UnsupportedMediaType with a clear message
    chains = chain_ids(config.diff_ids)
    layers = [
        Layer(d.media_type, d.digest, d.size, diff_id, chain)
        for d, diff_id, chain in zip(manifest.layers, config.diff_ids, chains, strict=True)
    ]
    platform = Platform.of(config.os, config.architecture, config.variant)
    return Image(
        reference, manifest_digest, manifest, config_digest, config, platform, layers,
        manifest_size=manifest_size,
    )  # fmt: skip


def check_layer_count(reference: str, manifest: ImageManifest) -> None:
    """InvalidImage when ``manifest`` lists more layers than ember runs (``MAX_LAYERS``)."""
    if len(manifest.layers) > MAX_LAYERS:
        raise InvalidImage(
            f"{reference} has {len(manifest.layers)} layers; ember takes images of at most "
            f"{MAX_LAYERS}",
            hint="squash some of its layers (buildah bud --squash, docker build --squash)",
        )


class Pulling:
    """An image whose layers may still be downloading (see ``ImageService.pulling``)."""

    def __init__(
        self,
        image: Image,
        content: ContentStore,
        downloads: Mapping[Digest, Download],
        cancel: Callable[[], None] | None = None,
    ) -> None:
        self.image = image
        self._content = content
        self._downloads = downloads
        self._cancel = cancel

    def cancel(self) -> None:
        """Stop the downloads now, for a caller about to fail that would otherwise wait
        for them (a thread of its own reading the layers): what reads a layer still
        arriving raises PullCancelled.  Leaving the pull's block with an error cancels
        them too; nothing for a local image."""
        if self._cancel is not None:
            self._cancel()

    def layer_path(self, index: int) -> Path:
        """Layer ``index``'s blob, once it is downloaded and verified (raises what its
        download raised)."""
        digest = self.image.layers[index].digest
        download = self._downloads.get(digest)
        if download is not None:
            download.result()
        return self._content.path(digest)

    def open_layer(self, index: int) -> io.RawIOBase | None:
        """Layer ``index``'s blob for reading from its first byte while it still
        downloads (an ``ArrivingBlob``: unverified until the end of the stream; reading
        raises what failed the download); None once it is stored (read ``layer_path``):
        raises what its download raised."""
        download = self._downloads.get(self.image.layers[index].digest)
        if download is not None:
            arriving = download.open_arriving()
            if arriving is not None:
                return arriving
        self.layer_path(index)
        return None


def _verified_bytes(download: Download, content: ContentStore) -> bytes:
    """A small blob's bytes once they matched its digest: before the fsync and rename that
    store it, when it is being downloaded (the recorder waits for those, and fails the
    pull if they fail); else read from the store (it was there already, or its download
    started over), and checked again: a stored copy can be damaged on disk."""
    arriving = download.open_arriving()
    if arriving is not None:
        with arriving, suppress(BlobRestarted):
            return arriving.readall()
    download.result()
    return content.read_intact(download.desc.digest)


def _digest_in(value: object) -> Digest | None:
    """A digest an image table column holds, or None when it holds something else."""
    if not isinstance(value, str):
        return None
    try:
        return Digest.parse(value)
    except FormatError:
        return None


def _warn(text: str) -> None:
    """A warning the CLI shows as an ``ember:`` line (``warnings_as_messages``)."""
    import logging  # only when there is something to say: ``image ls`` loads this module

    logging.getLogger("ember.images").warning("%s", text)


class _Recorder:
    """Runs ``store`` in its own thread once every download in ``downloads`` succeeded,
    unless the pull was abandoned before."""

    def __init__(self, downloads: list[Download], store: Callable[[], None]) -> None:
        self._downloads = downloads
        self._store = store
        self._lock = threading.Lock()
        self._abandoned = False
        self._started = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ember-record", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for d in self._downloads:
                d.result()
            with self._lock:
                if self._abandoned:
                    return
                self._started = True
            self._store()
        except BaseException as e:  # a failed download is raised by its waiter too
            self._error = e

    def wait(self) -> None:
        """Until recorded; raises what recording raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Record nothing unless recording has begun, in which case wait for it to end
        (a few fsyncs and a row); never waits for the downloads."""
        with self._lock:
            self._abandoned = True
            started = self._started
        if started:
            self._thread.join()


class ImageService:
    def __init__(self, home: Home, *, notice: Notice | None = None) -> None:
        """``notice``: where to say (one line) that a command waits for another's lock."""
        self.home = home.ensure()
        self.content = ContentStore(home.content)
        self.table = ImageTable(open_image_db(home.db_path))
        self.credentials = CredentialStore(home.credentials)
        self.notice = notice
        self.claims = Claims(self.home, notice)

    # -- pulling -------------------------------------------------------------

    def _open_source(self, spec: SourceSpec, plain_http: bool) -> Source:
        if spec.kind == "oci":
            assert spec.path is not None
            return OciLayoutSource(spec.path, spec.selector, spec.name)
        if spec.kind == "docker-archive":
            assert spec.path is not None
            # tarfile and the archive reader only for this source (~2 ms of imports)
            from ember.images.dockerarchive import DockerArchiveSource

            return DockerArchiveSource(spec.path, spec.selector, spec.name)
        assert spec.reference is not None
        from ember.images.registrysource import RegistrySource  # http.client, ssl: only when needed

        creds = self.credentials.lookup(spec.reference.registry)
        return RegistrySource(spec.reference, plain_http=plain_http, credentials=creds)

    def pull(
        self,
        ref: str,
        platform: Platform | None = None,
        *,
        plain_http: bool = False,
        progress: bool | None = None,
    ) -> Image:
        """Fetch ``ref`` (registry reference, ``oci:DIR[:TAG]``, ``docker-archive:FILE``) and
        record it.  Without ``platform``, an index gives this host's image."""
        with self.pulling(ref, platform, plain_http=plain_http, progress=progress) as pulled:
            pass
        return pulled.image

    def load(
        self,
        path: Path,
        *,
        label: str | None = None,
        named_at: Path | None = None,
        progress: bool | None = None,
    ) -> Iterator[Loaded]:
        """Every image of the ``docker save`` archive at ``path`` (as ``docker load``), one
        by one as each is recorded, under the names its ``RepoTags`` give.  One without
        any ember can use is recorded as ``docker-archive:NAMED_AT:@N``: without
        ``named_at`` (an archive that has no path of its own: standard input), or one
        that cannot be named so, such an image is refused before anything is loaded.
        The archive is opened and indexed once.  ``label``: how messages name it."""
        from ember.images.dockerarchive import DockerArchiveSource

        archive = DockerArchiveSource(path, None, "", label=label)
        try:
            plan = [_load_names(tags) for tags in archive.repo_tags()]
            nameable = named_at is not None and ":" not in str(named_at)
            for number, (names, _skipped) in enumerate(plan):
                if not names and not nameable:
                    raise InvalidSource(
                        f"image {number} of {archive.label} has no name (RepoTags) ember can "
                        "record it under",
                        hint="load it from a file whose path has no ':' (ember image load -i "
                        "FILE), where it is named docker-archive:FILE:@N, or give it a name "
                        "when saving it",
                    )
            for number, (names, skipped) in enumerate(plan):
                own = f"docker-archive:{named_at}:@{number}"
                source = archive.select(f"@{number}", own)
                recorded = names or [own]
                before = {n: r.manifest_digest for n in recorded if (r := self.table.get(n))}
                with self._pull_from(source, None, progress, False, recorded) as pulled:
                    pass
                moved = [
                    (n, old) for n, old in before.items() if old != pulled.image.manifest_digest
                ]
                yield Loaded(pulled.image, recorded, skipped, moved)
        finally:
            archive.close()

    @contextmanager
    def pulling(
        self,
        ref: str,
        platform: Platform | None = None,
        *,
        plain_http: bool = False,
        progress: bool | None = None,
    ) -> Iterator[Pulling]:
        """Pull ``ref``, handing the image out once its config is checked, while the
        layers download; records it when the body returns and every blob is in.
        If the body raises, the downloads are cancelled and nothing is recorded."""
        with self._pull(ref, platform, plain_http=plain_http, progress=progress) as pulled:
            yield pulled

    @contextmanager
    def _pull(
        self,
        ref: str,
        platform: Platform | None,
        *,
        plain_http: bool,
        progress: bool | None,
        for_host: bool = False,
    ) -> Iterator[Pulling]:
        """``for_host``: ``platform`` is this host's, which the caller did not name (the
        refusal says how to ask for another)."""
        spec = parse_source(ref)
        source = self._open_source(spec, plain_http)
        try:
            with self._pull_from(source, platform, progress, for_host, [spec.name]) as pulled:
                yield pulled
        finally:
            source.close()

    @contextmanager
    def _pull_from(
        self,
        source: Source,
        platform: Platform | None,
        progress: bool | None,
        for_host: bool,
        names: Sequence[str],
    ) -> Iterator[Pulling]:
        """``_pull`` of an open source, recorded under ``names``."""
        with (
            images_lock(self.home, exclusive=False, notice=self.notice),
            make_progress(progress) as display,
            self._pulling(source, platform, display, for_host, names) as pulled,
        ):
            yield pulled

    @contextmanager
    def _pulling(
        self,
        source: Source,
        platform: Platform | None,
        display: PullProgress,
        for_host: bool,
        names: Sequence[str],
    ) -> Iterator[Pulling]:
        resolved = source.resolve(platform)
        manifest = parse_manifest(resolved.data, resolved.media_type)
        if not isinstance(manifest, ImageManifest):
            raise InvalidImage(f"{source.name} resolved to an index, not an image manifest")
        cfg = manifest.config
        if cfg.media_type not in mt.CONFIG_TYPES:
            raise InvalidImage(
                f"{source.name} is not a container image (config media type {cfg.media_type[:120]!r})"
            )
        if cfg.size > MAX_CONFIG_SIZE:
            raise InvalidImage(
                f"{source.name}: config of {cfg.size} bytes is larger than ember accepts"
            )
        for desc in manifest.layers:
            mt.layer_compression(desc.media_type)
        # The image table's schema check (a file to create and migrate in a fresh
        # store) runs beside the downloads; ``put`` below repeats it if it failed.
        migrating = threading.Thread(target=self._migrate_quietly, daemon=True)
        migrating.start()

        def record(image: Image) -> None:
            migrating.join()
            self.table.put(
                names,
                manifest_digest=resolved.digest,
                config_digest=cfg.digest,
                media_type=manifest.media_type,
                platform=str(image.platform),
                size=image.content_size,
                index_digest=resolved.index_digest,
            )

        # The claim comes before anything looks at the store (a removal spares what it
        # names) and goes after the image is recorded.  One directory fsync for all the
        # blobs, before the table names them.
        digests = [resolved.digest, cfg.digest, *(d.digest for d in manifest.layers)]
        with (
            self.claims.hold(digests),
            self.content.batch(),
            self._fetching(source, resolved, manifest, platform, for_host, display, record)
            as pulled,
        ):
            yield pulled

    def _migrate_quietly(self) -> None:
        with suppress(Exception):
            self.table.db.migrate()

    @contextmanager
    def _fetching(
        self,
        source: Source,
        resolved: Resolved,
        manifest: ImageManifest,
        platform: Platform | None,
        for_host: bool,
        display: PullProgress,
        record: Callable[[Image], None],
    ) -> Iterator[Pulling]:
        """Config and layers at once: the layers go to worker threads while this
        thread fetches and checks the config; the image is handed out then.

        Once every layer is in, a recorder thread stores the manifest, makes the
        blob names durable and records the image (``record``), while the caller
        may still be applying the last layers: that work (a few fsyncs) is off
        its path.  A caller that fails before then abandons the pull: nothing is
        recorded.  Leaving the block waits for the recorder and raises what
        failed.

        Whatever stops the pull (a config that makes the image unusable, a failed
        blob, the caller's error, Ctrl-C) cancels every download, the running ones
        too; what they received stays in the ingest files for the next pull.
        """
        check_layer_count(source.name, manifest)  # before any download starts
        cfg = manifest.config
        unique: dict[Digest, Descriptor] = {}
        for desc in manifest.layers:
            unique.setdefault(desc.digest, desc)
        todo = list(unique.values())
        display.set_total(sum(d.size for d in todo))
        config_fetch = Download(cfg, None)
        downloads = {
            d.digest: Download(d, display.blob(d, f"layer {i + 1}/{len(todo)}"))
            for i, d in enumerate(todo)
        }
        # one worker more than layers at once: the config's, first in the queue, so
        # that it is asked for first
        workers = Downloads(
            source,
            self.content,
            [config_fetch, *downloads.values()],
            max(1, min(MAX_PARALLEL_BLOBS, len(todo))) + 1,
        )
        recorder: _Recorder | None = None
        try:
            config = parse_config(_verified_bytes(config_fetch, self.content))
            image = build_image(
                source.name, resolved.digest, manifest, cfg.digest, config,
                manifest_size=len(resolved.data),
            )  # fmt: skip
            if platform is not None and not platform.matches(image.platform):
                if for_host:
                    raise NoMatchingPlatform(
                        f"{source.name} is for {image.platform}, not for this host ({platform})",
                        # ember run boots images for this host only: no --platform there
                        hint=f"image pull, unpack and prepare take --platform {image.platform}",
                    )
                raise NoMatchingPlatform(f"{source.name} is for {image.platform}, not {platform}")

            def store_and_record() -> None:
                # last: a failed pull leaves no manifest whose blobs are missing
                self.content.put_bytes(resolved.data, resolved.digest)
                # before the table names the blobs
                self.content.sync_names([resolved.digest, cfg.digest, *downloads])
                record(image)

            # the config too: it was read before its fsync and rename (_verified_bytes)
            fetches = [config_fetch, *downloads.values()]
            recorder = _Recorder(fetches, store_and_record)
            yield Pulling(image, self.content, downloads, cancel=workers.cancel)
            for d in fetches:
                d.result()
            recorder.wait()
        except BaseException:
            workers.cancel()
            if recorder is not None:
                recorder.abandon()
            workers.join(CANCEL_GRACE)
            raise
        finally:
            for d in (config_fetch, *downloads.values()):
                d.close()

    # -- local queries -------------------------------------------------------

    def _lookup(self, ref: str, *, by_repository: bool = True) -> list[ImageRecord]:
        """The records ``ref`` names: one for a name; for a manifest digest or an
        unambiguous hex prefix of one, every name the image has; for ``NAME@DIGEST``
        (``by_repository``), the names of that image in that repository."""
        try:
            ref.encode()
        except UnicodeEncodeError:
            # an argument of bytes that are not UTF-8 (the shell passes them as they are):
            # no name can hold it, and the database refused it with a traceback
            raise InvalidReference(f"{ref!r:.200} is not valid UTF-8") from None
        if _FULL_ID.fullmatch(ref):
            # `sha256:<hex>` is an ID, whatever names there are: Docker reads it so, and a
            # name of that shape (from before such names were refused) must not hide it
            matches = self.table.find_by_digest(ref)
            if matches:
                return matches
        name = ref
        invalid: Exception | None = None
        spec: SourceSpec | None = None
        try:
            spec = parse_source(ref)
            name = spec.name
        except (FormatError, InvalidSource) as e:
            invalid = e  # unless it is a digest prefix (or a name recorded as given)
        # the name as given too: oci: names recorded before paths were normalised
        for candidate in dict.fromkeys((name, ref)):
            record = self.table.get(candidate)
            if record is not None:
                return [record]
        pinned = spec.reference if spec is not None else None
        if by_repository and pinned is not None and pinned.digest is not None:
            # NAME[:TAG]@DIGEST, what `image pull` prints: the image of that digest that
            # has a name in that repository (the tag aside, as Docker reads it)
            matches = [
                r for r in self.table.find_by_digest(str(pinned.digest))
                if r.manifest_digest == pinned.digest and _repository_of(r.reference) == pinned.name
            ]  # fmt: skip
            if matches:
                return matches
        if _HEX_PREFIX.fullmatch(ref):
            matches = self.table.find_by_digest(ref)
            if len({m.manifest_digest for m in matches}) > 1:
                raise ImageNotFound(f"{ref} matches several images: give more of the digest")
            if matches:
                return matches
            # "image docker.io/library/6823913902e4:latest is not in the local store"
            # would answer a question the user did not ask
            raise ImageNotFound(
                f"no image in the local store has the ID {ref}",
                hint="IDs are the manifest digests that ember image ls shows",
            )
        if invalid is not None:
            # "not in the local store (pull it: ember image pull UPPER/x)" would send
            # the user to a pull that cannot work: say what is wrong with the name
            raise invalid
        raise ImageNotFound(
            f"image {name} is not in the local store", hint=f"pull it: ember image pull {ref}"
        )

    def known_as(self, ref: str) -> set[str]:
        """What ``ref`` may be recorded as in a machine's record (``ember ps --filter
        ancestor=REF``): the manifest digest and names of the local images it names, and
        its full name even when no local image has it now (a machine outlives its image)."""
        names = {ref}
        with suppress(FormatError, InvalidSource):
            names.add(parse_source(ref).name)
        with suppress(ImageNotFound, AmbiguousImage, FormatError, InvalidSource):
            for record in self._lookup(ref):
                names.update((str(record.manifest_digest), record.reference))
        return names

    def _record(self, ref: str) -> ImageRecord:
        return self._lookup(ref)[0]

    def _load(self, record: ImageRecord) -> Image:
        damaged = partial(
            ImageNotFound, hint=f"pull it again: ember image pull {record.reference}"
        )
        try:
            manifest_data = self._stored(record.manifest_digest)
            manifest = parse_manifest(manifest_data, record.media_type)
            config = parse_config(self._stored(record.config_digest))
        except BlobNotFound as e:
            raise damaged(f"image {record.reference} is damaged ({e})") from None
        except FormatError as e:  # verified when stored: the store's copy is what changed
            raise damaged(f"image {record.reference} cannot be read from the local store ({e})") from None
        if not isinstance(manifest, ImageManifest):
            raise InvalidImage(f"image {record.reference}: stored manifest is an index")
        return build_image(
            record.reference, record.manifest_digest, manifest, record.config_digest, config,
            manifest_size=len(manifest_data),
        )  # fmt: skip

    def _stored(self, digest: Digest) -> bytes:
        """A small blob of the store, checked against its digest (a few KB: cheap).

        One that no longer matches (edited, damaged on disk) is deleted, so that
        pulling the image again fetches it: the store only skips blobs it has."""
        try:
            return self.content.read_intact(digest)
        except DamagedBlob:
            raise BlobNotFound(f"blob {digest} no longer matches its digest and was removed") from None

    def get(self, ref: str) -> Image:
        """The local image named ``ref`` (a reference, source name or digest prefix)."""
        return self._load(self._record(ref))

    def ensure(
        self, ref: str, platform: Platform | None = None, *, plain_http: bool = False
    ) -> Image:
        """The local image ``ref``, pulled first when it is missing, incomplete or for
        another platform than ``platform``; see ``ensuring`` for ``platform=None``."""
        # no claim on a local image's blobs: it would end with this call (``ember run``
        # protects them with the snapshotter's lease while it builds from them)
        with self._ensuring(ref, platform, plain_http=plain_http, claim=False) as ready:
            pass
        return ready.image

    @contextmanager
    def ensuring(
        self,
        ref: str,
        platform: Platform | None = None,
        *,
        plain_http: bool = False,
        progress: bool | None = None,
    ) -> Iterator[Pulling]:
        """``ensure`` for a caller that applies the layers: a local image at once, else
        ``pulling`` (layers handed out as they arrive).

        Without ``platform`` the image must be this host's, as the commands' help
        says: a local image pulled for another platform (``--platform``) is refused,
        not used silently, and so is a pulled one that turns out to be for another
        platform (a single-platform image).  A missing one is pulled for this host.

        A local image's blobs are claimed while the caller uses them: a removal
        meanwhile spares them (``ember.images.locking``)."""
        with self._ensuring(ref, platform, plain_http=plain_http, progress=progress) as ready:
            yield ready

    @contextmanager
    def _ensuring(
        self,
        ref: str,
        platform: Platform | None,
        *,
        plain_http: bool,
        progress: bool | None = None,
        claim: bool = True,
    ) -> Iterator[Pulling]:
        host = host_platform()
        try:
            image: Image | None = self.get(ref)
        except ImageNotFound:
            image = None
        if image is not None and platform is None and not host.matches(image.platform):
            raise NoMatchingPlatform(
                f"image {image.reference} in the local store is for {image.platform}, "
                f"not for this host ({host})",
                hint=f"if {ref} also has an image for this host, ember image pull --platform "
                f"{host} {ref} gets it; image unpack and prepare take --platform {image.platform}",
            )
        if image is not None and (platform is None or platform.matches(image.platform)):
            digests = [image.manifest_digest, image.config_digest]
            digests += [layer.digest for layer in image.layers]
            with self.claims.hold(digests) if claim else nullcontext():
                if self._complete(image):
                    yield Pulling(image, self.content, {})
                    return
            platform = platform or image.platform  # it lost a blob: fetch it again
        with self._pull(
            ref,
            platform or host,
            plain_http=plain_http,
            progress=progress,
            for_host=platform is None,
        ) as pulled:
            yield pulled

    def _complete(self, image: Image) -> bool:
        """Whether the store has every blob of ``image`` (manifest and config were just
        read and checked), each layer of the size its descriptor declares: a layer torn
        on disk is then fetched again by a pull (which hashes the stored copy and
        replaces it) rather than fail where it is applied."""
        if not all(self.content.exists(d) for d in (image.manifest_digest, image.config_digest)):
            return False
        try:
            return all(self.content.size(x.digest) == x.size for x in image.layers)
        except BlobNotFound:
            return False

    def list(self) -> list[ImageRecord]:
        return self.table.list()

    def layer_path(self, layer: Layer) -> Path:
        return self.content.path(layer.digest)

    @contextmanager
    def holding(self, refs: Sequence[str]) -> Iterator[builtins.list[Image]]:
        """The local images ``refs`` name (names or IDs), their blobs claimed while inside:
        a removal meanwhile spares them.  ImageNotFound if one is missing or lost a blob."""
        images = [self.get(ref) for ref in refs]
        digests = [d for img in images for d in (img.manifest_digest, img.config_digest)]
        digests += [layer.digest for img in images for layer in img.layers]
        with self.claims.hold(digests):
            # all of them, now claimed: one removed between the load and the claim is gone
            for img in images:
                for digest in (img.manifest_digest, img.config_digest, *(x.digest for x in img.layers)):
                    if not self.content.exists(digest):
                        raise ImageNotFound(
                            f"image {img.reference} lost blob {digest} from the local store",
                            hint=f"pull it again: ember image pull {img.reference}",
                        )
            yield images

    def tag(self, source: str, target: str) -> ImageRecord:
        """Name the local image ``source`` (a name, or an ID: a digest prefix) also
        ``target``, as ``docker tag``: a registry reference, normalised (``busybox`` is
        ``docker.io/library/busybox:latest``); a name another image had moves to this one."""
        name = str(name_for_tag(target))
        # Under the claims lock, as a removal reads and deletes: an `image rm` of the source
        # at the same moment either goes first (the source is gone: not found) or sees the
        # new name (and keeps the blobs it names).
        with self.claims.frozen():
            record = self._record(source)
            image = self._load(record)
            for layer in image.layers:  # complete in the store: a damaged image is not named again
                if not self.content.exists(layer.digest):
                    raise ImageNotFound(
                        f"image {record.reference} lost layer {layer.digest} from the local store",
                        hint=f"pull it again: ember image pull {record.reference}",
                    )
            return self.table.put(
                name,
                manifest_digest=record.manifest_digest,
                config_digest=record.config_digest,
                media_type=record.media_type,
                platform=record.platform,
                size=record.size,
                index_digest=record.index_digest,
            )

    # -- removal -------------------------------------------------------------

    def _blobs_in_use(self, removing: str) -> set[Digest] | None:
        """The blobs the image table's records name (those of ``removing`` deleted
        already); None when a damaged record's cannot be known: every blob then stays.

        ``ImageTable.list`` refuses the whole table at its first damaged row, which made
        ``image rm`` of any image fail half-way (its row deleted, its blobs left) while
        another image's record was damaged: the rows are then read one by one."""
        try:
            return {d for other in self.table.list() for d in self._blobs_of(other)}
        except DamagedImageRecord:
            pass
        in_use: set[Digest] = set()
        for reference, manifest_text, config_text, media_type, index_text in self.table.raw_rows():
            try:
                if not isinstance(reference, str):
                    raise DamagedImageRecord(repr(reference), "its reference is not text")
                record = self.table.get(reference)
            except DamagedImageRecord as e:
                named = self._blobs_of_damaged(manifest_text, config_text, media_type, index_text)
                if named is None:
                    _warn(
                        f"kept every blob of {removing}: {e.message}, and which blobs it names "
                        f"cannot be read ({e.hint}; ember gc then removes what no image uses)"
                    )
                    return None
                _warn(f"{e.message}: the blobs it names were kept ({e.hint})")
                in_use |= named
                continue
            if record is not None:  # (not removed meanwhile)
                in_use |= self._blobs_of(record)
        return in_use

    def _blobs_of_damaged(
        self, manifest_text: object, config_text: object, media_type: object, index_text: object
    ) -> set[Digest] | None:
        """The blobs a damaged record may name, from the values of it that can still be
        read and its manifest blob; None when its manifest cannot be read: any blob may
        then be one of its layers."""
        named = {d for t in (manifest_text, config_text, index_text) if (d := _digest_in(t))}
        manifest_digest = _digest_in(manifest_text)
        if manifest_digest is None:
            return None
        try:
            manifest = parse_manifest(
                self.content.read_bytes(manifest_digest),
                media_type if isinstance(media_type, str) else None,
            )
        except (BlobNotFound, FormatError):
            return None
        if isinstance(manifest, ImageManifest):
            named.add(manifest.config.digest)
            named.update(d.digest for d in manifest.layers)
        return named

    def _blobs_of(self, record: ImageRecord) -> set[Digest]:
        out = {record.manifest_digest, record.config_digest}
        try:
            manifest = parse_manifest(
                self.content.read_bytes(record.manifest_digest), record.media_type
            )
        except (BlobNotFound, FormatError):
            return out
        if isinstance(manifest, ImageManifest):
            out.update(d.digest for d in manifest.layers)
        return out

    @contextmanager
    def _leases_held(self) -> Iterator[set[Digest]]:
        """Content that live snapshot leases claim, with lease changes held off meanwhile.

        A lease (``ember.snapshots``) protects blobs an operation is using, e.g.
        layers a snapshot is being built from; removal must not pull them away.
        Holding the snapshotter's GC lock exclusively, as its GC does, keeps a
        new lease from appearing between this read and the deletions.
        """
        base = Path(os.path.realpath(self.home.snapshots))
        leases_dir, gc_lock = base / "leases", base / "locks" / "gc.lock"
        if not leases_dir.is_dir() or not gc_lock.parent.is_dir():
            yield set()  # no snapshotter state: nothing can hold a lease
            return
        from ember.snapshots.leases import Leases

        with FileLock(gc_lock, notice=self.notice):  # a wait: ember gc sweeping
            now = time.time()
            claimed: set[Digest] = set()
            for lease in Leases(leases_dir, gc_lock).list():
                if lease.expired(now):
                    continue
                for text in lease.content:
                    with suppress(FormatError):
                        claimed.add(Digest.parse(text))
            yield claimed

    def remove(self, ref: str, *, force: bool = False) -> builtins.list[str]:
        """Forget ``ref`` and delete the blobs that no other image, no running pull and no
        live lease uses; returns the names forgotten.

        A digest (prefix) names the image under all its names: with several, only
        ``force`` removes them (all), as ``docker rmi -f`` does.  A damaged record is
        only forgotten: which blobs it used is unknown, so they are left to ``ember gc``.
        Another image's damaged record does not stop the removal: the blobs it may
        name are kept (all of them when its manifest cannot be read), with a warning.

        Removal does not take ``images.lock`` and so does not wait for pulls (of this
        image or any other): it spares the blobs they claim (``ember.images.locking``).
        """
        with ExitStack() as stack:
            # the order ember gc takes them in: gc.lock, then claims.lock (the other
            # order deadlocked an rm and a gc started together)
            leased = stack.enter_context(self._leases_held())
            claimed = stack.enter_context(self.claims.frozen())
            try:
                # NAME@DIGEST is not read as every name of that image in that repository:
                # removing names the user did not give
                records = self._lookup(ref, by_repository=False)
            except DamagedImageRecord as e:
                self.table.delete(e.reference)
                return [e.reference]
            except ImageNotFound as e:
                # as `docker rmi`: no advice to pull what is being removed
                raise ImageNotFound(e.message) from None
            if len(records) > 1 and not force:
                names = ", ".join(r.reference for r in records)
                raise AmbiguousImage(
                    f"{ref} is referenced by several names: {names}",
                    hint="remove them by name, or use -f/--force to remove all",
                )
            doomed: set[Digest] = set()
            for record in records:
                doomed |= self._blobs_of(record)
            for record in records:
                self.table.delete(record.reference)
            in_use = self._blobs_in_use(ref)
            doomed = set() if in_use is None else doomed - in_use
            for digest in doomed - leased - claimed:
                self.content.delete(digest)
        return [r.reference for r in records]
