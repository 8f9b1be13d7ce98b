"""Where an image comes from: a registry, an OCI layout, or a docker archive.

Names follow skopeo's transports: ``oci:DIR[:TAG]`` and
``docker-archive:FILE[:REF]``; anything else is a registry reference.  Every
source resolves to one image manifest (choosing from an index by platform)
and copies blobs into the content store through its verifying writer.

The local sources copy through ``fetch_local``: their blobs are files, read
twice when need be rather than trusted once, so that a blob that is not what
its descriptor says is refused before a byte of it is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ember.images.cancel import Cancellation
from ember.images.errors import InvalidSource
from ember.oci.digest import ALGORITHMS as DIGEST_ALGORITHMS
from ember.oci.digest import Digest, Verifier
from ember.oci.manifest import Descriptor
from ember.oci.platform import Platform
from ember.oci.reference import Reference
from ember.store.content import ContentStore, WriteObserver

OCI_PREFIX = "oci:"
DOCKER_ARCHIVE_PREFIX = "docker-archive:"
DOCKER_PREFIX = "docker://"
#: skopeo's other transports: named as unsupported rather than parsed as a registry host
#: ("invalid registry host 'dir:'").  Not ``docker:``, whose ``docker:dind`` is an image.
OTHER_TRANSPORTS = frozenset(
    {"dir", "oci-archive", "docker-daemon", "containers-storage", "ostree", "sif", "tarball"}
)
SUPPORTED = (
    "a registry reference (REF or docker://REF), oci:DIR[:TAG], docker-archive:FILE[:REF]"
)
_TRANSPORT = re.compile(r"^([a-z][a-z0-9+.-]*):")


@dataclass(frozen=True)
class Resolved:
    """The image manifest a source resolved to."""

    data: bytes
    media_type: str
    digest: Digest
    index_digest: Digest | None = None


class Source(Protocol):
    #: the name the image table records
    name: str

    def resolve(self, platform: Platform | None) -> Resolved: ...

    def fetch(
        self,
        desc: Descriptor,
        store: ContentStore,
        progress: Callable[[int], None] | None,
        cancel: Cancellation | None = None,
        *,
        observer: WriteObserver | None = None,
    ) -> None:
        """Copy the blob into ``store``, verified; stops (PullCancelled) soon after
        ``cancel`` is cancelled, keeping what arrived where it can be resumed (a
        registry download; a local source, never resumed, keeps nothing).
        ``observer`` follows the blob's file while a download writes it; a local
        source copies a blob in one go, already verified, and tells it nothing."""
        ...

    def close(self) -> None: ...


def already_stored(store: ContentStore, desc: Descriptor, where: str) -> bool:
    """Whether ``store`` holds an intact copy of ``desc``'s blob already (one damaged on
    disk is removed, to be copied again: ``ContentStore.size_for_reuse``).  Its size must
    then be the one ``desc`` declares: the image's size is counted from the descriptors,
    and the stored copy matches the digest, so a descriptor that differs from it is lying."""
    size = store.size_for_reuse(desc.digest, desc.size)
    if size is None:
        return False
    if size != desc.size:
        raise InvalidSource(
            f"{where}: blob {desc.digest} is {size} bytes, its descriptor declares {desc.size} "
            "(the copy in the local store matches its digest: the descriptor is wrong)"
        )
    return True


def fetch_local(
    desc: Descriptor,
    store: ContentStore,
    read: Callable[[], Iterable[bytes]],
    progress: Callable[[int], None] | None,
    where: str,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Copy a blob of a local source into ``store``, verified before and while it is copied.

    ``read()`` yields the blob's bytes from the start each time it is called (a
    seekable file).  A first pass checks digest and size in place, so that a blob that
    is not what ``desc`` says (a 4 GiB hole under a wrong digest) writes nothing: it
    raises DigestMismatch.  The copy is verified again (the file may change meanwhile)
    and ``check`` sees it before it is published (ContentStore.ingest).  Costs a second
    read of the blob, from the page cache as a rule.
    """
    if already_stored(store, desc, where):
        if progress:
            progress(desc.size)
        return
    verifier = Verifier(desc.digest, desc.size)
    for chunk in read():
        verifier.update(chunk)  # stops at the first byte beyond the declared size
    verifier.verify()
    store.ingest(desc.digest, desc.size, read(), progress, check)


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "registry" | "oci" | "docker-archive"
    name: str  # canonical: what the image table records
    reference: Reference | None = None
    path: Path | None = None
    selector: str | None = None  # oci tag, or docker-archive image reference


def _split_path(rest: str, what: str) -> tuple[Path, str | None]:
    """``PATH[:SELECTOR]``: the path is everything before the first ':', as skopeo reads
    it.  (Not "unless the whole exists": ``oci:/x/a:b`` then named directory ``a:b`` or
    tag ``b`` of ``a`` as the file system stood, two images under one name in the image
    table.  A path with a ':' in it cannot be named, as with skopeo.)"""
    if not rest:
        raise InvalidSource(f"{what} needs a path, e.g. {what}/path/to/it")
    try:
        rest.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes: the image table stores names as UTF-8
        raise InvalidSource(f"{what} path {rest!r:.200} is not valid UTF-8") from None
    if ":" not in rest:
        return _absolute(rest), None
    path, _, selector = rest.partition(":")
    if not path:
        raise InvalidSource(f"{what} needs a path before ':'")
    return _absolute(path), selector or None


def _absolute(path: str) -> Path:
    """Absolute and lexically normal (``a/../b`` is ``b``, as the shell's ``cd`` reads it),
    so that one directory has one name in the image table whatever directory it was
    named from; symlinks are left alone (``Path.absolute`` kept the ``..``)."""
    return Path(os.path.abspath(path))


def parse_source(text: str) -> SourceSpec:
    if text.startswith(OCI_PREFIX):
        path, tag = _split_path(text[len(OCI_PREFIX) :], OCI_PREFIX)
        return SourceSpec(
            "oci", f"{OCI_PREFIX}{path}" + (f":{tag}" if tag else ""), path=path, selector=tag
        )
    if text.startswith(DOCKER_ARCHIVE_PREFIX):
        path, selector = _split_path(text[len(DOCKER_ARCHIVE_PREFIX) :], DOCKER_ARCHIVE_PREFIX)
        if selector is not None and not selector.startswith("@"):
            selector = str(Reference.parse(selector))
        name = f"{DOCKER_ARCHIVE_PREFIX}{path}" + (f":{selector}" if selector else "")
        return SourceSpec("docker-archive", name, path=path, selector=selector)
    transport = None if text.startswith(DOCKER_PREFIX) else _TRANSPORT.match(text)
    if transport and (
        transport.group(1) in OTHER_TRANSPORTS or text[transport.end() :].startswith("/")
    ):
        # ``dir:/tmp``: a transport, not a registry host (which a path cannot follow)
        raise InvalidSource(
            f"unsupported image transport {transport.group(0)!r} in {text[:200]!r}: "
            f"ember pulls {SUPPORTED}"
        )
    ref = Reference.parse(text.removeprefix(DOCKER_PREFIX))
    return SourceSpec("registry", str(ref), reference=ref)


def name_for_tag(text: str) -> Reference:
    """``text`` as a name to record an image under (``image tag``'s TARGET, a ``docker
    load`` RepoTag): a registry reference without a digest, normalised as a pull would
    (``bb`` is ``docker.io/library/bb:latest``).  FormatError or InvalidSource otherwise,
    also for a name that reads as an ID (``sha256:<hex>``: repository ``sha256``), which
    ``image rm ID`` would then remove instead of the image with that ID."""
    spec = parse_source(text)
    if spec.reference is None:
        raise InvalidSource(
            f"cannot name an image {text[:200]!r}: a tag is a registry reference "
            "(NAME[:TAG]), not an oci: or docker-archive: source"
        )
    if spec.reference.digest is not None:
        raise InvalidSource(f"refusing to create a tag with a digest reference: {text[:200]}")
    if spec.reference.familiar().split(":", 1)[0] in DIGEST_ALGORITHMS:
        raise InvalidSource(f"refusing to create a tag that reads as an image ID: {text[:200]}")
    return spec.reference
