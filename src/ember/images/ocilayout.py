"""Reading images from an OCI image layout directory (``oci:DIR[:TAG]``).

The layout is outside input: ``index.json`` is parsed like any index, tags
come from ``org.opencontainers.image.ref.name`` annotations, and every blob
is verified (digest and size) where it lies before it is copied, and again on
its way into the content store (``sources.fetch_local``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ember import jsonutil
from ember.fsutil import NotRegularFile, open_regular
from ember.images.cancel import Cancellation
from ember.images.errors import ImageNotFound, InvalidSource
from ember.images.sources import Resolved, fetch_local
from ember.oci import mediatypes as mt
from ember.oci.digest import Digest, Verifier
from ember.oci.errors import DigestMismatch, FormatError
from ember.oci.manifest import MAX_MANIFEST_SIZE, Descriptor, ImageIndex, parse_manifest
from ember.oci.platform import Platform, select_manifest
from ember.store.content import ContentStore, WriteObserver

REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20
_MAX_NESTING = 4
#: ``oci-layout`` is ``{"imageLayoutVersion": "1.0.0"}``: anything near this is not one
_MAX_LAYOUT_FILE = 64 * 1024


class _TooLarge(OSError):
    pass


def _reason(e: OSError) -> str:
    """The OS's words without the path (messages name the file themselves)."""
    return e.strerror or str(e)


class _Outside(OSError):
    pass


def _open_inside(layout: Path, path: Path) -> BinaryIO:
    """``open_regular(path)``, refused (``_Outside``) when the file lies outside
    ``layout``: a symlink in a layout made elsewhere (a downloaded archive) made ember
    read any file its caller may (and say its size and digest when they did not match).
    The check is made on the file reached, before it is opened (``open_regular``'s
    ``vet``): opening a device outside (/dev/watchdog) has effects of its own."""
    inside = os.path.join(os.path.realpath(layout), "")

    def vet(fd: int) -> None:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(inside):
            raise _Outside(0, "a link that leads outside the layout")

    return open_regular(path, vet=vet)


def _read_capped(layout: Path, path: Path, limit: int) -> bytes:
    """A small file of the layout, whole; OSError if it is not a regular file inside the
    layout or holds more than ``limit`` bytes."""
    with _open_inside(layout, path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _TooLarge(f"larger than {limit} bytes")
    return data


class OciLayoutSource:
    def __init__(self, path: Path, tag: str | None, name: str) -> None:
        self.path = path
        self.tag = tag
        self.name = name

    def close(self) -> None:
        pass

    def _blob_path(self, digest: Digest) -> Path:
        return self.path / "blobs" / digest.algorithm / digest.hex

    def _open_blob(self, digest: Digest) -> BinaryIO:
        try:
            return _open_inside(self.path, self._blob_path(digest))
        except _Outside:
            raise InvalidSource(
                f"OCI layout {self.path}: blob {digest} is a link that leads outside the layout"
            ) from None
        except (FileNotFoundError, NotADirectoryError):
            # NotADirectoryError: ``blobs`` or ``blobs/ALG`` is a file, so no blob is there
            raise InvalidSource(f"OCI layout {self.path} lacks blob {digest}") from None
        except NotRegularFile:
            raise InvalidSource(
                f"OCI layout {self.path}: blob {digest} is not a regular file"
            ) from None
        except OSError as e:
            raise self._unreadable(digest, e) from None

    def _unreadable(self, digest: Digest, e: OSError) -> InvalidSource:
        return InvalidSource(f"cannot read blob {digest} in OCI layout {self.path}: {_reason(e)}")

    def _read_small(self, desc: Descriptor, limit: int) -> bytes:
        if desc.size > limit:
            raise InvalidSource(
                f"blob {desc.digest} in {self.path} declares {desc.size} bytes, more than {limit}"
            )
        with self._open_blob(desc.digest) as f:
            try:
                data = f.read(limit + 1)
            except OSError as e:
                raise self._unreadable(desc.digest, e) from None
        check = Verifier(desc.digest, desc.size)
        try:
            check.update(data)
            check.verify()
        except DigestMismatch as e:
            raise InvalidSource(f"OCI layout {self.path} holds a corrupt blob: {e}") from None
        return data

    def _index(self) -> ImageIndex:
        try:
            layout = jsonutil.loads(_read_capped(self.path, self.path / "oci-layout", _MAX_LAYOUT_FILE))
        except (FileNotFoundError, NotADirectoryError):
            raise InvalidSource(
                f"{self.path} is not an OCI image layout (no oci-layout file)"
            ) from None
        except (OSError, ValueError) as e:
            detail = _reason(e) if isinstance(e, OSError) else f"not JSON ({e})"
            raise InvalidSource(f"cannot read {self.path / 'oci-layout'}: {detail}") from None
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if not (isinstance(version, str) and version.startswith("1.")):
            raise InvalidSource(f"{self.path}: unsupported OCI layout version")
        try:
            data = _read_capped(self.path, self.path / "index.json", MAX_MANIFEST_SIZE)
        except OSError as e:
            raise InvalidSource(f"cannot read {self.path / 'index.json'}: {_reason(e)}") from None
        try:
            index = parse_manifest(data, mt.OCI_INDEX)
        except FormatError as e:  # "manifest is not valid JSON" would not say which file
            raise InvalidSource(f"{self.path / 'index.json'}: {e}") from None
        if not isinstance(index, ImageIndex):
            raise InvalidSource(f"{self.path / 'index.json'} is not an image index")
        return index

    def resolve(self, platform: Platform | None) -> Resolved:
        index = self._index()
        tags = sorted({t for d in index.manifests if (t := (d.annotations or {}).get(REF_NAME))})
        if self.tag is not None:
            candidates = [
                d for d in index.manifests if (d.annotations or {}).get(REF_NAME) == self.tag
            ]
            if not candidates:
                raise ImageNotFound(
                    f"no image tagged {self.tag!r} in OCI layout {self.path} (tags: {', '.join(tags) or 'none'})"
                )
        else:
            candidates = list(index.manifests)
            if len(candidates) > 1:
                raise InvalidSource(
                    f"OCI layout {self.path} holds {len(candidates)} images: name one with "
                    f"oci:{self.path}:TAG (tags: {', '.join(tags) or 'none'})"
                )
            if not candidates:
                raise ImageNotFound(f"OCI layout {self.path} holds no image")
        if len(candidates) == 1:
            desc = candidates[0]
        else:
            desc = select_manifest(ImageIndex(mt.OCI_INDEX, candidates), platform)
        index_digest: Digest | None = None
        for _ in range(_MAX_NESTING):
            data = self._read_small(desc, MAX_MANIFEST_SIZE)
            parsed = parse_manifest(data, desc.media_type)
            if isinstance(parsed, ImageIndex):
                index_digest = desc.digest
                desc = select_manifest(parsed, platform)
                continue
            return Resolved(data, parsed.media_type, desc.digest, index_digest)
        raise InvalidSource(f"OCI layout {self.path}: indexes nested too deeply")

    def fetch(
        self,
        desc: Descriptor,
        store: ContentStore,
        progress: Callable[[int], None] | None,
        cancel: Cancellation | None = None,
        *,
        observer: WriteObserver | None = None,  # a local copy is not followed (see Source)
    ) -> None:
        src: BinaryIO | None = None

        def read() -> Iterator[bytes]:
            nonlocal src
            if src is None:  # opened on the first read: a blob the store has needs none
                src = self._open_blob(desc.digest)
            return self._chunks(src, desc.digest, cancel)

        try:
            fetch_local(desc, store, read, progress, f"OCI layout {self.path}")
        except DigestMismatch as e:
            raise InvalidSource(f"OCI layout {self.path} holds a corrupt blob: {e}") from None
        finally:
            if src is not None:
                src.close()

    def _chunks(
        self, src: BinaryIO, digest: Digest, cancel: Cancellation | None = None
    ) -> Iterator[bytes]:
        """The blob from its start (every read of it: it is read twice)."""
        # Only errors reading the layout are the source's fault; the store's own
        # (a full disk) pass through ingest unchanged.
        try:
            src.seek(0)
        except OSError as e:
            raise self._unreadable(digest, e) from None
        while True:
            if cancel is not None:
                cancel.check()
            try:
                chunk = src.read(_CHUNK)
            except OSError as e:
                raise self._unreadable(digest, e) from None
            if not chunk:
                return
            yield chunk
