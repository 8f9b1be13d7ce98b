"""Reading images from ``docker save`` / ``podman save`` archives (``docker-archive:FILE``).

The archive is a tar holding ``manifest.json`` (a list of ``{Config, RepoTags,
Layers}``), the config file and one file per layer, usually uncompressed tars
(newer Docker stores them as ``blobs/sha256/...``, the same content).  Layer
files may be symlinks to others in the archive, which are followed inside it.

The archive is indexed with ember's own tar header reader (the layer
unpacker's, ``ember.unpack.tarstream``), never with tarfile's archive walk:
Python 3.11's tarfile loops for ever on a negative size (CVE-2025-8194), takes
quadratic time on a pax header of digits (CVE-2024-6232) and reads extended
headers whole into memory, however large they claim to be.

An uncompressed layer's digest is its DiffID, so it is imported as an OCI tar
layer and verified against the config, in the archive and again while it is
copied.  A compressed one (gzip/zstd by magic) is hashed first, which proves
nothing about it: its uncompressed content is checked against the DiffID
before it is published.  The manifest ember records is synthesised from these
descriptors in canonical JSON, so importing the same archive twice gives the
same manifest digest.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ember import jsonutil
from ember.fsutil import open_regular, why_unopened
from ember.images.cancel import Cancellation
from ember.images.errors import ImageNotFound, InvalidSource
from ember.images.sources import Resolved, fetch_local
from ember.oci import mediatypes as mt
from ember.oci.config import MAX_CONFIG_SIZE, parse_config
from ember.oci.digest import Digest
from ember.oci.errors import DigestMismatch, FormatError
from ember.oci.manifest import (
    MAX_DESCRIPTORS,
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageIndex,
    ImageManifest,
    parse_manifest,
)
from ember.oci.mediatypes import Compression, layer_compression
from ember.oci.platform import Platform
from ember.oci.reference import Reference
from ember.store.content import ContentStore, WriteObserver
from ember.unpack.compression import UncompressedReader
from ember.unpack.errors import InvalidLayer
from ember.unpack.tarstream import FileReader, TarStream

_CHUNK = 1 << 20
_MAX_MANIFEST_JSON = 4 * 1024 * 1024
_MAX_LINK_HOPS = 16
#: bytes of index.json's manifests read at most looking for an image's own (a hostile
#: index could name thousands of 4 MiB ones; a real one names a few KiB per image)
_MAX_SAVED_MANIFEST_BYTES = 16 << 20
#: the annotation Docker and containerd give an OCI index entry: the image's full name
IMAGE_NAME = "io.containerd.image.name"
#: members indexed (each kept in memory); ``docker save`` writes a few per layer
_MAX_MEMBERS = 1 << 16
#: compressed archives recognised by their magic, to say so instead of "not a tar"
ARCHIVE_MAGIC = {
    "gzip": b"\x1f\x8b",
    "zstd": b"\x28\xb5\x2f\xfd",
    "xz": b"\xfd7zXZ\x00",
    "bzip2": b"BZh",
}
_DECOMPRESS = {
    "gzip": "gunzip -k FILE",
    "zstd": "zstd -d FILE",
    "xz": "unxz -k FILE",
    "bzip2": "bunzip2 -k FILE",
}


def compression_of(head: bytes) -> str | None:
    """The compression an archive's first bytes announce, if any."""
    for name, magic in ARCHIVE_MAGIC.items():
        if head.startswith(magic):
            return name
    return None


def _open_archive(path: Path, label: str) -> BinaryIO:
    try:
        return open_regular(path)
    except OSError as e:
        raise InvalidSource(f"docker archive {label} {why_unopened(e)}") from None


def _norm(name: str) -> str | None:
    path = posixpath.normpath(name.lstrip("/"))
    if path in (".", "") or path.startswith("../") or path == "..":
        return None
    return path


@dataclass(frozen=True)
class _Blob:
    """What ``fetch`` copies for a digest: the config's bytes, or an archive member."""

    member: tarfile.TarInfo | None = None
    data: bytes | None = None
    #: its name in the archive, for messages
    name: str = ""
    #: a compressed layer: its compression and the DiffID its uncompressed content must
    #: have (None for the others: an uncompressed layer's digest is its DiffID)
    compression: Compression = "none"
    diff_id: Digest | None = None


def _tags(item: dict[str, Any]) -> list[str]:
    """A manifest.json entry's RepoTags, the strings among them."""
    raw = item.get("RepoTags") or []
    return [t for t in raw if isinstance(t, str)] if isinstance(raw, list) else []


class DockerArchiveSource:
    def __init__(self, path: Path, selector: str | None, name: str, *, label: str | None = None) -> None:
        """``label``: how messages name the archive (default: its path; e.g. "standard
        input" for one copied from there)."""
        self.path = path
        self.selector = selector
        self.name = name
        self.label = label if label is not None else str(path)
        self._file = _open_archive(path, self.label)
        self._owner = True
        try:
            self._members = self._index()
        except BaseException:
            self._file.close()
            raise
        self._blobs: dict[Digest, _Blob] = {}
        #: digests of compressed layer members, by where their data lies in the archive
        self._member_digests: dict[int, Digest] = {}
        self._entries_cache: list[dict[str, Any]] | None = None

    def select(self, selector: str, name: str) -> DockerArchiveSource:
        """Another image of the same archive (``:REF`` or ``:@N``), recorded as ``name``:
        the archive read and indexed once for all of them (``ember image load``).  Closing
        the view leaves the archive open; closing this closes it."""
        view = copy.copy(self)
        view.selector, view.name = selector, name
        view._owner = False
        view._blobs = {}
        return view

    def _index(self) -> dict[str, tarfile.TarInfo]:
        """The archive's members by normalised name (the last of a name wins, as tar does)."""
        members: dict[str, tarfile.TarInfo] = {}
        count = 0
        try:
            # The whole walk, not only the first header, reads outside input: a
            # truncated or corrupt archive fails part-way through it.  The reader
            # bounds every header and seeks over file data (never reading it here).
            for entry in TarStream(FileReader(self._file.fileno())):
                count += 1
                if count > _MAX_MEMBERS:
                    raise InvalidSource(
                        f"docker archive {self.label} has more than {_MAX_MEMBERS} members: "
                        "not an image that docker save writes"
                    )
                key = _norm(entry.info.name)
                if key is not None:
                    members[key] = entry.info
        except (OSError, InvalidLayer) as e:
            detail = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
            if count:  # a header was read: what follows it is wrong
                raise InvalidSource(
                    f"docker archive {self.label} is truncated or damaged ({detail})"
                ) from None
            raise self._not_an_archive(detail) from None
        if not members:
            raise self._not_an_archive("it holds no file")
        return members

    def _not_an_archive(self, detail: str) -> InvalidSource:
        compression = self._compression()
        if compression is not None:
            # ``docker load`` takes ``docker save | gzip``; ember reads the archive's
            # members in place (by offset, several at once), which a compressed
            # stream does not allow without a decompressed copy on disk first.
            return InvalidSource(
                f"docker archive {self.label} is {compression}-compressed: ember reads "
                "uncompressed archives only",
                hint=f"decompress it first ({_DECOMPRESS[compression]}), or write it "
                "with docker save -o FILE; ember image load -i FILE takes it as it is",
            )
        return InvalidSource(f"{self.label} is not a docker archive (an uncompressed tar): {detail}")

    def _compression(self) -> str | None:
        """The compression the archive's first bytes announce, if any."""
        try:
            head = os.pread(self._file.fileno(), 6, 0)
        except OSError:
            return None
        return compression_of(head)

    def close(self) -> None:
        if self._owner:
            self._file.close()

    def _member(self, name: str) -> tarfile.TarInfo:
        key = _norm(name)
        for hop in range(_MAX_LINK_HOPS):
            member = self._members.get(key) if key else None
            if member is None:
                if not hop:
                    raise InvalidSource(f"docker archive {self.label} lacks {name[:200]!r}")
                if key is None:
                    raise InvalidSource(
                        f"docker archive {self.label}: {name[:200]!r} is a link that leads out of the archive"
                    )
                raise InvalidSource(
                    f"docker archive {self.label} lacks {name[:200]!r} "
                    f"(a link to {key[:200]!r}, which is not there)"
                )
            if member.isfile():
                return member
            if member.issym():
                key = _norm(posixpath.join(posixpath.dirname(key or ""), member.linkname))
            elif member.islnk():
                key = _norm(member.linkname)
            else:
                raise InvalidSource(f"docker archive {self.label}: {name[:200]!r} is not a file")
        raise InvalidSource(f"docker archive {self.label}: too many links for {name[:200]!r}")

    def _chunks(
        self,
        member: tarfile.TarInfo,
        limit: int | None = None,
        cancel: Cancellation | None = None,
    ) -> Iterator[bytes]:
        """A member's bytes, read by offset (pread leaves the file position alone): safe from several threads."""
        if member.issparse():
            raise InvalidSource(
                f"docker archive {self.label}: {member.name[:200]!r} is a sparse member"
            )
        remaining = member.size if limit is None else min(limit, member.size)
        offset = member.offset_data
        fd = self._file.fileno()
        while remaining > 0:
            if cancel is not None:
                cancel.check()
            try:
                chunk = os.pread(fd, min(_CHUNK, remaining), offset)
            except OSError as e:
                raise InvalidSource(
                    f"cannot read docker archive {self.label}: {e.strerror or e}"
                ) from None
            if not chunk:
                raise InvalidSource(f"docker archive {self.label} is truncated")
            offset += len(chunk)
            remaining -= len(chunk)
            yield chunk

    def _read(self, name: str, limit: int) -> bytes:
        member = self._member(name)
        if member.size > limit:
            raise InvalidSource(
                f"docker archive {self.label}: {name[:200]!r} is larger than {limit} bytes"
            )
        return b"".join(self._chunks(member))

    def _entries(self) -> list[dict[str, Any]]:
        """manifest.json: one entry an image (read once, shared with ``select``'s views)."""
        if self._entries_cache is None:
            self._entries_cache = self._read_entries()
        return self._entries_cache

    def _read_entries(self) -> list[dict[str, Any]]:
        try:
            entries = jsonutil.loads(self._read("manifest.json", _MAX_MANIFEST_JSON))
        except ValueError as e:
            raise InvalidSource(
                f"docker archive {self.label}: manifest.json is not JSON: {e}"
            ) from None
        if (
            not isinstance(entries, list)
            or not all(isinstance(e, dict) for e in entries)
            or not entries
        ):
            raise InvalidSource(
                f"docker archive {self.label}: manifest.json must be a non-empty list"
            )
        return entries

    def repo_tags(self) -> list[list[str]]:
        """Each image's ``RepoTags`` as the archive gives them (the strings), in order: the
        names ``docker load`` gives them (checked by the caller)."""
        return [_tags(item) for item in self._entries()]

    def _entry(self) -> dict[str, Any]:
        entries = self._entries()
        if self.selector is None:
            if len(entries) > 1:
                names = ", ".join(t for item in entries for t in _tags(item)) or "untagged"
                raise InvalidSource(
                    f"docker archive {self.label} holds {len(entries)} images: name one with "
                    f"docker-archive:{self.label}:REF or :@INDEX ({names})"
                )
            return entries[0]
        if self.selector.startswith("@"):
            number = self.selector[1:]
            try:
                # ASCII digits only: int() also takes "-1" (the last), "1_0", " 1", "٣"
                if not (number.isascii() and number.isdigit()):
                    raise ValueError(number)
                return entries[int(number)]
            except (ValueError, IndexError):
                raise ImageNotFound(
                    f"docker archive {self.label} has no image number {self.selector[1:]!r}"
                ) from None
        for item in entries:
            for t in _tags(item):
                try:
                    if str(Reference.parse(t)) == self.selector:
                        return item
                except FormatError:
                    continue
        raise ImageNotFound(f"no image {self.selector} in docker archive {self.label}")

    def _layer_descriptor(self, name: str, diff_id: Digest) -> Descriptor:
        member = self._member(name)
        head = b"".join(self._chunks(member, 4))
        if head[:2] == b"\x1f\x8b" or head == b"\x28\xb5\x2f\xfd":
            compression: Compression = "gzip" if head[:2] == b"\x1f\x8b" else "zstd"
            media_type = mt.OCI_LAYER_GZIP if compression == "gzip" else mt.OCI_LAYER_ZSTD
            # A digest of the member itself, true by construction: ``fetch`` checks what
            # it decompresses to against the DiffID.  Hashed once per member, however
            # often manifest.json names it (10,000 names of one 100 MB member were
            # 13 minutes of hashing).
            digest = self._member_digests.get(member.offset_data)
            if digest is None:
                h = hashlib.sha256()
                for chunk in self._chunks(member):
                    h.update(chunk)
                digest = self._member_digests[member.offset_data] = Digest("sha256", h.hexdigest())
            known = self._blobs.get(digest)
            if known is not None and known.diff_id != diff_id:
                raise InvalidSource(
                    f"docker archive {self.label}: layers {known.name[:200]!r} and {name[:200]!r} "
                    "hold the same data, but the config gives them different DiffIDs"
                )
            self._blobs[digest] = _Blob(member, None, name, compression, diff_id)
        else:
            # Uncompressed: the blob digest is the DiffID, checked before and while copying.
            media_type, digest = mt.OCI_LAYER_TAR, diff_id
            self._blobs[digest] = _Blob(member, None, name)
        return Descriptor(media_type, digest, member.size)

    def resolve(self, platform: Platform | None) -> Resolved:
        entry = self._entry()
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise InvalidSource(
                f"docker archive {self.label}: manifest.json entry lacks Config or Layers"
            )
        if len(layer_names) > MAX_DESCRIPTORS:  # before any of them is read
            raise InvalidSource(
                f"docker archive {self.label}: {len(layer_names)} layers, more than the "
                f"{MAX_DESCRIPTORS} ember accepts"
            )
        config_data = self._read(config_name, MAX_CONFIG_SIZE)
        config = parse_config(config_data)
        if len(layer_names) != len(config.diff_ids):
            raise InvalidSource(
                f"docker archive {self.label}: {len(layer_names)} layers but the config lists {len(config.diff_ids)}"
            )
        config_digest = Digest.of(config_data)
        self._blobs[config_digest] = _Blob(data=config_data, name=config_name)
        layers = []
        for name, diff_id in zip(layer_names, config.diff_ids, strict=True):
            if not isinstance(name, str):
                raise InvalidSource(f"docker archive {self.label}: a layer name is not a string")
            layers.append(self._layer_descriptor(name, diff_id))
        config_desc = Descriptor(mt.OCI_CONFIG, config_digest, len(config_data))
        saved = self._saved_manifest(config_desc, layers)
        if saved is not None:
            return saved
        manifest = ImageManifest(media_type=mt.OCI_MANIFEST, config=config_desc, layers=layers)
        data = manifest.to_json()
        return Resolved(data, mt.OCI_MANIFEST, Digest.of(data))

    def _saved_manifest(self, config: Descriptor, layers: list[Descriptor]) -> Resolved | None:
        """The image's own manifest, when the archive also is an OCI layout (Docker 25's
        ``docker save``, ``ember image save``) and its ``index.json`` names one for exactly
        this config and these layers (digests, sizes, a config media type, layers of the
        same compression and no ``urls``): the image keeps its ID (manifest digest)
        through a save and a load.  The entry named as the image was selected comes
        first.  Anything else (no index, a manifest that differs in anything, a damaged
        one) leaves the manifest made from ``manifest.json``."""
        if _norm("index.json") not in self._members:
            return None
        try:
            index = parse_manifest(self._read("index.json", MAX_MANIFEST_SIZE), mt.OCI_INDEX)
        except (InvalidSource, FormatError):
            return None
        if not isinstance(index, ImageIndex):
            return None
        wanted = [(d.digest, d.size, layer_compression(d.media_type)) for d in layers]
        # the entry of the name the image was selected by first (one saved under several
        # names may have several manifests: the same layers, other annotations)
        entries = sorted(
            index.manifests,
            key=lambda d: (d.annotations or {}).get(IMAGE_NAME) != self.selector,
        )
        budget = _MAX_SAVED_MANIFEST_BYTES
        for desc in entries:
            if desc.digest.algorithm != "sha256" or desc.size > min(MAX_MANIFEST_SIZE, budget):
                continue
            budget -= desc.size
            name = f"blobs/sha256/{desc.digest.hex}"
            try:
                data = self._read(name, desc.size)  # no more than the index declares
                if len(data) != desc.size or Digest.of(data) != desc.digest:
                    continue
                manifest = parse_manifest(data, desc.media_type)
            except (InvalidSource, ImageNotFound, FormatError):
                continue
            if (
                not isinstance(manifest, ImageManifest)
                or (manifest.config.digest, manifest.config.size) != (config.digest, config.size)
                or manifest.config.media_type not in mt.CONFIG_TYPES
                or any(d.urls for d in manifest.layers)
            ):
                continue
            try:
                theirs = [
                    (d.digest, d.size, layer_compression(d.media_type)) for d in manifest.layers
                ]
            except FormatError:  # a layer type ember does not unpack: not this one
                continue
            if theirs == wanted:
                return Resolved(data, manifest.media_type, desc.digest)
        return None

    def fetch(
        self,
        desc: Descriptor,
        store: ContentStore,
        progress: Callable[[int], None] | None,
        cancel: Cancellation | None = None,
        *,
        observer: WriteObserver | None = None,  # a local copy is not followed (see Source)
    ) -> None:
        blob = self._blobs[desc.digest]

        def read() -> Iterable[bytes]:
            if blob.data is not None:
                return (blob.data,)
            assert blob.member is not None
            return self._chunks(blob.member, cancel=cancel)

        check = None
        if blob.diff_id is not None:
            check = functools.partial(self._check_diff_id, blob, desc.digest, cancel)
        try:
            fetch_local(desc, store, read, progress, f"docker archive {self.label}", check)
        except DigestMismatch as e:
            if blob.diff_id is not None:  # its digest was computed from the member itself
                raise InvalidSource(
                    f"docker archive {self.label} changed while it was read ({e})"
                ) from None
            raise InvalidSource(
                f"docker archive {self.label}: a layer does not match the DiffID its config declares ({e})"
            ) from None

    def _check_diff_id(
        self, blob: _Blob, digest: Digest, cancel: Cancellation | None, path: Path
    ) -> None:
        """Refuse a compressed layer (copied to ``path``, not yet published) that does not
        decompress to its DiffID: its digest, computed from it, vouches for nothing.  The
        unpacker would refuse it too, but an image that names it would be recorded first,
        its blob of any size (a gzip magic, then a hole) kept.  One that expands further
        than the unpacker's budget (a decompression bomb) is refused as it would be."""
        assert blob.diff_id is not None
        hasher = blob.diff_id.hasher()
        view = memoryview(bytearray(_CHUNK))
        name = f"layer {digest} ({blob.name[:200]!r} in the archive)"
        with UncompressedReader(path, blob.compression, name=name) as reader:
            while True:
                if cancel is not None:
                    cancel.check()
                try:
                    n = reader.readinto(view)
                except InvalidLayer as e:  # more than its expansion budget
                    raise InvalidSource(f"docker archive {self.label}: {e.message}") from None
                except Exception as e:  # the decompressor's own errors: corrupt data
                    raise InvalidSource(
                        f"docker archive {self.label}: layer {blob.name[:200]!r} is not valid "
                        f"{blob.compression} data ({str(e)[:200] or type(e).__name__})"
                    ) from None
                if not n:
                    break
                hasher.update(view[:n])
        got = Digest(blob.diff_id.algorithm, hasher.hexdigest())
        if got != blob.diff_id:
            raise InvalidSource(
                f"docker archive {self.label}: layer {blob.name[:200]!r} does not decompress to "
                f"the DiffID its config declares (expected {blob.diff_id}, got {got})"
            )
