"""Images to one archive file: ``ember image save`` (as ``docker save``).

The tar is at once an OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/...``) and a ``docker save`` archive (``manifest.json``: each
image's ``Config``, ``RepoTags`` and ``Layers``, naming those same blobs), as
Docker 25 and later write it.  So ``docker load``, ``podman load``, skopeo's
``docker-archive:`` and ``oci-archive:`` and ``ember image pull docker-archive:``
read it, and unpacked it is an ``oci:`` layout.  Blobs go in as the store holds
them: the manifest as pulled (its digest, the image's ID, stays the same) and
layers compressed (Docker writes uncompressed tars; the readers take both).

Every blob is checked against its digest while it is written: a blob damaged in
the store fails the save rather than going out.  ``archive_documents`` is the
pure part (the small JSON files); ``write_archive`` the tar.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
import stat
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ember.fsutil import TEMP_SUFFIX, fsync_dir, link_open_file
from ember.images.dockerarchive import IMAGE_NAME
from ember.images.errors import SaveError
from ember.images.model import Image
from ember.images.ocilayout import REF_NAME
from ember.oci.digest import Digest
from ember.oci.reference import Reference
from ember.store.content import ContentStore

_OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


@dataclass(frozen=True)
class SavedImage:
    """An image as the archive names it: ``reference`` None for one that has no
    registry name (pulled from ``oci:`` or ``docker-archive:``)."""

    image: Image
    reference: Reference | None


def blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def archive_documents(saved: Iterable[SavedImage]) -> dict[str, bytes]:
    """``oci-layout``, ``index.json`` and ``manifest.json`` for ``saved``, in that order.

    ``index.json`` has an entry a name (as Docker writes it); ``manifest.json`` one an
    image, with all its names as ``RepoTags``."""
    index: list[dict[str, object]] = []
    by_image: dict[Digest, dict[str, object]] = {}
    named: set[tuple[Digest, str | None]] = set()
    for s in saved:
        img = s.image
        key = (img.manifest_digest, str(s.reference) if s.reference is not None else None)
        if key in named:  # the same image under the same name (or none) twice: once
            continue
        named.add(key)
        entry: dict[str, object] = {
            "mediaType": img.manifest.media_type,
            "digest": str(img.manifest_digest),
            "size": img.manifest_size,
        }
        ref = s.reference
        if ref is not None:
            entry["annotations"] = {IMAGE_NAME: str(ref), **({REF_NAME: ref.tag} if ref.tag else {})}
        index.append(entry)
        listed = by_image.setdefault(img.manifest_digest, {
            "Config": blob_name(img.config_digest),
            "RepoTags": [],
            "Layers": [blob_name(layer.digest) for layer in img.layers],
        })  # fmt: skip
        tags = listed["RepoTags"]
        assert isinstance(tags, list)
        if ref is not None and ref.tag and ref.digest is None and ref.familiar() not in tags:
            tags.append(ref.familiar())
    index_doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": index}  # fmt: skip
    return {
        "oci-layout": _OCI_LAYOUT,
        "index.json": json.dumps(index_doc, separators=(",", ":")).encode(),
        "manifest.json": json.dumps(list(by_image.values()), separators=(",", ":")).encode(),
    }


def _blobs(saved: Iterable[SavedImage]) -> list[Digest]:
    """Every blob the images use, each once: manifests, configs, layers."""
    out: dict[Digest, None] = {}
    for s in saved:
        out[s.image.manifest_digest] = None
        out[s.image.config_digest] = None
        out.update((layer.digest, None) for layer in s.image.layers)
    return list(out)


def _member(name: str, size: int = 0, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = size
    info.mtime = 0  # the same images give the same archive
    return info


class _Verified(io.RawIOBase):
    """A blob's bytes as tarfile copies them, hashed; ``check`` after the last one."""

    def __init__(self, raw: BinaryIO, digest: Digest) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._hash = hashlib.new(digest.algorithm)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer) or 0  # type: ignore[attr-defined]
        self._hash.update(memoryview(buffer)[:n])
        return n

    def check(self) -> None:
        if self._hash.hexdigest() != self._digest.hex:
            raise _damaged(self._digest)


def _damaged(digest: Digest) -> SaveError:
    return SaveError(
        f"blob {digest} in the local store no longer matches its digest",
        hint="pull the image again (ember image pull) and save it again",
    )


def write_archive(
    saved: list[SavedImage], store: ContentStore, out: BinaryIO, *, check_first: bool = False
) -> None:
    """Write the archive of ``saved`` to ``out`` (a stream: nothing is sought).  Each blob
    is checked against its digest as it is copied; with ``check_first`` (for a stream
    nobody takes back, standard output) also before any of it goes out, so that a blob
    damaged in the store is never sent whole before the error ends the stream."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        documents = archive_documents(saved)
        for name in ("oci-layout", "index.json", "manifest.json"):
            data = documents[name]
            tar.addfile(_member(name, len(data)), io.BytesIO(data))
        tar.addfile(_member("blobs", directory=True))
        for algorithm in sorted({d.algorithm for d in _blobs(saved)}):
            tar.addfile(_member(f"blobs/{algorithm}", directory=True))
        for digest in _blobs(saved):
            if check_first and not store.matches(digest):
                raise _damaged(digest)
            with store.open(digest) as blob:
                size = os.fstat(blob.fileno()).st_size
                verified = _Verified(blob, digest)
                tar.addfile(_member(blob_name(digest), size), verified)
                if blob.read(1):  # grew while it was copied: damaged
                    raise _damaged(digest)
                verified.check()


def write_archive_file(saved: list[SavedImage], store: ContentStore, path: Path) -> None:
    """``write_archive`` to ``path``, which then holds the whole archive or is as it was.

    The archive is written to an unnamed file in ``path``'s directory (``O_TMPFILE``:
    a save killed part-way leaves nothing behind), fsynced, named, and renamed over
    ``path``.  Mode 0600, as ``docker save -o`` makes it: an image may be private.  A
    ``path`` that is there and not a regular file (a device, a FIFO, a symlink) is
    refused, as Docker refuses it: renaming over it would replace it (``-o /dev/null``
    as root replaced the system's)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise SaveError(
                f"{path} is there and is not a regular file: -o takes a file to write "
                "(a new one, or one to replace); for a device or a pipe, redirect standard "
                "output instead"
            )
    directory = path.parent
    tmp: str | None = None  # the file's temporary name, once it has one
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
            raise
        # a file system without unnamed files: a named one from the start
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write_archive(saved, store, f)
            f.flush()
            os.fsync(f.fileno())
            if tmp is None:
                name = str(directory / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
                link_open_file(f.fileno(), Path(name))
                tmp = name
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    fsync_dir(directory)
