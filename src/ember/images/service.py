"""The host image service: pull images into the content store, name them, hand them out.

A pull resolves the source to one image manifest, checks its layer types,
downloads config and layers at once through the verifying content-store writer
with bounded concurrency, validates the config meanwhile (one DiffID per
layer, the platform asked for), stores the manifest blob last, makes the blob
names durable (one directory fsync) and then records the reference.  Readers
therefore never see a reference whose blobs are missing.

Pulls hold a shared lock and ``remove`` an exclusive one while it deletes
blobs no other image uses, so a removal never deletes a blob that a
concurrent pull is about to record.

``pulling``/``ensuring`` hand the image out as soon as its config is checked,
while the layers still download: whoever applies the layers (``ember image
unpack``, a snapshot chain) asks ``Pulling.layer_path(i)``, which waits for
that one verified blob, so applying layer 1 overlaps downloading layers 2..n.
The image is recorded as soon as everything is fetched, in a thread beside the
caller's work; a caller that fails before then abandons the pull and nothing is
recorded.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import EmberError
from ember.home import Home
from ember.images.errors import ImageNotFound, InvalidImage, InvalidSource
from ember.images.model import Image, Layer
from ember.images.ocilayout import OciLayoutSource
from ember.images.progress import PullProgress, make_progress
from ember.images.sources import Resolved, Source, SourceSpec, parse_source
from ember.oci import mediatypes as mt
from ember.oci.chainid import chain_ids
from ember.oci.config import MAX_CONFIG_SIZE, ImageConfig, parse_config
from ember.oci.digest import Digest
from ember.oci.errors import FormatError, NoMatchingPlatform
from ember.oci.manifest import Descriptor, ImageManifest, parse_manifest
from ember.oci.platform import Platform
from ember.registry.client.credentials import CredentialStore
from ember.store.content import ContentStore
from ember.store.errors import BlobNotFound, DamagedImageRecord
from ember.store.images import ImageRecord, ImageTable, open_image_db

if TYPE_CHECKING:
    from concurrent.futures import Future

#: blobs downloaded at once, as skopeo does (with a distant registry, a 5-layer image at 4
#: at a time took two round trips: 1.13x -> 0.60x of skopeo copy at 30 ms per blob)
MAX_PARALLEL_BLOBS = 6
_HEX_PREFIX = re.compile(r"^(?:sha256:)?[0-9a-f]{6,64}$")


def build_image(
    reference: str,
    manifest_digest: Digest,
    manifest: ImageManifest,
    config_digest: Digest,
    config: ImageConfig,
) -> Image:
    """Check that manifest and config make an image ember can unpack, and describe it."""
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
    return Image(reference, manifest_digest, manifest, config_digest, config, platform, layers)


class Pulling:
    """An image whose layers may still be downloading (see ``ImageService.pulling``)."""

    def __init__(
        self, image: Image, content: ContentStore, downloads: Mapping[Digest, Future[object]]
    ) -> None:
        self.image = image
        self._content = content
        self._downloads = downloads

    def layer_path(self, index: int) -> Path:
        """Layer ``index``'s blob, once it is downloaded and verified (raises what its
        download raised)."""
        digest = self.image.layers[index].digest
        download = self._downloads.get(digest)
        if download is not None:
            download.result()
        return self._content.path(digest)


class _Recorder:
    """Runs ``store`` in its own thread once every download in ``downloads`` succeeded,
    unless the pull was abandoned before."""

    def __init__(self, downloads: list[Future[object]], store: Callable[[], None]) -> None:
        self._downloads = downloads
        self._store = store
        self._abandoned = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ember-record", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for f in self._downloads:
                f.result()
            if not self._abandoned.is_set():
                self._store()
        except BaseException as e:  # a failed download is raised by its waiter too
            self._error = e

    def wait(self) -> None:
        """Until recorded; raises what recording raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Record nothing unless recording has begun; returns once the thread is done
        (after the downloads not cancelled, which the pool waits for anyway)."""
        self._abandoned.set()
        self._thread.join()


class ImageService:
    def __init__(self, home: Home) -> None:
        self.home = home.ensure()
        self.content = ContentStore(home.content)
        self.table = ImageTable(open_image_db(home.db_path))
        self.credentials = CredentialStore(home.credentials)

    # -- locking -------------------------------------------------------------

    @contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        self.home.run.mkdir(parents=True, exist_ok=True)
        with open(self.home.run / "images.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

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
        """Fetch ``ref`` (registry reference, ``oci:DIR[:TAG]``, ``docker-archive:FILE``) and record it."""
        with self.pulling(ref, platform, plain_http=plain_http, progress=progress) as pulled:
            pass
        return pulled.image

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
        If the body raises, the downloads are abandoned and nothing is recorded."""
        spec = parse_source(ref)
        source = self._open_source(spec, plain_http)
        try:
            with (
                self._lock(exclusive=False),
                make_progress(progress) as display,
                self._pulling(source, platform, display) as pulled,
            ):
                yield pulled
        finally:
            source.close()

    @contextmanager
    def _pulling(
        self, source: Source, platform: Platform | None, display: PullProgress
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
                source.name,
                manifest_digest=resolved.digest,
                config_digest=cfg.digest,
                media_type=manifest.media_type,
                platform=str(image.platform),
                size=image.size + cfg.size + len(resolved.data),
                index_digest=resolved.index_digest,
            )

        # One directory fsync for all the blobs, before the table names them.
        with self.content.batch(), self._fetching(
            source, resolved, manifest, platform, display, record
        ) as pulled:
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

        A config that makes the image unusable stops the pull before any queued
        layer starts (those already downloading finish: they are verified blobs).
        """
        cfg = manifest.config
        unique: dict[Digest, Descriptor] = {}
        for desc in manifest.layers:
            unique.setdefault(desc.digest, desc)
        todo = list(unique.values())
        display.set_total(sum(d.size for d in todo))
        # concurrent.futures (and the logging it imports, ~4 ms) only when something downloads
        from concurrent.futures import ThreadPoolExecutor

        # one worker more than layers at once: the config's, so that it is asked for first
        workers = max(1, min(MAX_PARALLEL_BLOBS, len(todo))) + 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            config_fetch = pool.submit(source.fetch, cfg, self.content, None)
            downloads: dict[Digest, Future[object]] = {
                d.digest: pool.submit(
                    source.fetch, d, self.content, display.blob(d, f"layer {i + 1}/{len(todo)}")
                )
                for i, d in enumerate(todo)
            }
            recorder: _Recorder | None = None
            try:
                config_fetch.result()
                config = parse_config(self.content.read_bytes(cfg.digest))
                image = build_image(source.name, resolved.digest, manifest, cfg.digest, config)
                if platform is not None and not platform.matches(image.platform):
                    raise NoMatchingPlatform(
                        f"{source.name} is for {image.platform}, not {platform}"
                    )

                def store_and_record() -> None:
                    # last: a failed pull leaves no manifest whose blobs are missing
                    self.content.put_bytes(resolved.data, resolved.digest)
                    self.content.sync_names()  # before the table names the blobs
                    record(image)

                recorder = _Recorder(list(downloads.values()), store_and_record)
                yield Pulling(image, self.content, downloads)
                for f in downloads.values():
                    f.result()
                recorder.wait()
            except BaseException:
                for f in downloads.values():
                    f.cancel()
                if recorder is not None:
                    recorder.abandon()
                raise

    # -- local queries -------------------------------------------------------

    def _record(self, ref: str) -> ImageRecord:
        name = ref
        invalid: EmberError | None = None
        try:
            name = parse_source(ref).name
        except (FormatError, InvalidSource) as e:
            invalid = e  # unless it is a digest prefix (or a name recorded as given)
        record = self.table.get(name)
        if record is not None:
            return record
        if _HEX_PREFIX.fullmatch(ref):
            matches = self.table.find_by_digest(ref)
            digests = {m.manifest_digest for m in matches}
            if len(digests) == 1:
                return matches[0]
            if len(digests) > 1:
                raise ImageNotFound(f"{ref} matches several images: give more of the digest")
        elif invalid is not None:
            # "not in the local store (pull it: ember image pull UPPER/x)" would send
            # the user to a pull that cannot work: say what is wrong with the name
            raise invalid
        raise ImageNotFound(
            f"image {name} is not in the local store", hint=f"pull it: ember image pull {ref}"
        )

    def _load(self, record: ImageRecord) -> Image:
        damaged = partial(
            ImageNotFound, hint=f"pull it again: ember image pull {record.reference}"
        )
        try:
            manifest = parse_manifest(self._stored(record.manifest_digest), record.media_type)
            config = parse_config(self._stored(record.config_digest))
        except BlobNotFound as e:
            raise damaged(f"image {record.reference} is damaged ({e})") from None
        except FormatError as e:  # verified when stored: the store's copy is what changed
            raise damaged(f"image {record.reference} cannot be read from the local store ({e})") from None
        if not isinstance(manifest, ImageManifest):
            raise InvalidImage(f"image {record.reference}: stored manifest is an index")
        return build_image(
            record.reference, record.manifest_digest, manifest, record.config_digest, config
        )

    def _stored(self, digest: Digest) -> bytes:
        """A small blob of the store, checked against its digest (a few KB: cheap).

        One that no longer matches (edited, damaged on disk) is deleted, so that
        pulling the image again fetches it: the store only skips blobs it has."""
        data = self.content.read_bytes(digest)
        if Digest.of(data, digest.algorithm) != digest:
            self.content.delete(digest)
            raise BlobNotFound(f"blob {digest} no longer matches its digest and was removed")
        return data

    def get(self, ref: str) -> Image:
        """The local image named ``ref`` (a reference, source name or digest prefix)."""
        return self._load(self._record(ref))

    def ensure(
        self, ref: str, platform: Platform | None = None, *, plain_http: bool = False
    ) -> Image:
        """The local image ``ref``, pulled first when it is missing, incomplete or for
        another platform."""
        with self.ensuring(ref, platform, plain_http=plain_http) as ready:
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
        ``pulling`` (layers handed out as they arrive)."""
        try:
            image: Image | None = self.get(ref)
        except ImageNotFound:
            image = None
        if image is not None and platform is not None and not platform.matches(image.platform):
            image = None
        elif image is not None and not all(
            self.content.exists(layer.digest) for layer in image.layers
        ):
            platform, image = platform or image.platform, None
        if image is not None:
            yield Pulling(image, self.content, {})
            return
        with self.pulling(ref, platform, plain_http=plain_http, progress=progress) as pulled:
            yield pulled

    def list(self) -> list[ImageRecord]:
        return self.table.list()

    def layer_path(self, layer: Layer) -> Path:
        return self.content.path(layer.digest)

    # -- removal -------------------------------------------------------------

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
        from ember.snapshots.locks import FileLock

        with FileLock(gc_lock):
            now = time.time()
            claimed: set[Digest] = set()
            for lease in Leases(leases_dir, gc_lock).list():
                if lease.expired(now):
                    continue
                for text in lease.content:
                    with suppress(FormatError):
                        claimed.add(Digest.parse(text))
            yield claimed

    def remove(self, ref: str) -> None:
        """Forget ``ref`` and delete the blobs that no other image and no live lease uses.

        A damaged record is only forgotten: which blobs it used is unknown, so they
        are left to ``ember gc``."""
        with self._lock(exclusive=True):
            try:
                record = self._record(ref)
            except DamagedImageRecord as e:
                self.table.delete(e.reference)
                return
            doomed = self._blobs_of(record)
            with self._leases_held() as leased:
                self.table.delete(record.reference)
                for other in self.table.list():
                    doomed -= self._blobs_of(other)
                for digest in doomed - leased:
                    self.content.delete(digest)
