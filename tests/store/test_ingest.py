"""``ContentStore.ingest``: blobs copied from local files, which are never resumed, so a
failure of any kind keeps nothing, and a blob the file system cannot hold writes nothing."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.errors import EmberError
from ember.oci.digest import Digest
from ember.store.content import ContentStore
from ember.store.errors import StoreError


@pytest.fixture()
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


@pytest.fixture()
def small_store(tmp_path: Path) -> Iterator[ContentStore]:
    """A store on a 1 MiB file system."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield ContentStore(mnt / "content")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _nothing_kept(store: ContentStore) -> None:
    assert list(store.list()) == [] and list(store.ingest_dir.iterdir()) == []


class SourceGone(EmberError):
    """What a local source raises when its file cannot be read any more."""


def test_ingest_keeps_nothing_when_its_source_fails(store: ContentStore) -> None:
    """Only a digest mismatch dropped the partial file: a source that failed (or a
    cancelled pull) left it in ingest/ for a resume that local sources never make."""
    data = os.urandom(3 << 20)

    def chunks() -> Iterator[bytes]:
        yield data[: 1 << 20]
        raise SourceGone("cannot read the layout any more")

    with pytest.raises(SourceGone):
        store.ingest(Digest.of(data), len(data), chunks())
    _nothing_kept(store)


def test_ingest_refuses_a_blob_larger_than_the_free_space_before_writing(
    store: ContentStore,
) -> None:
    free = os.statvfs(store.ingest_dir).f_bavail * os.statvfs(store.ingest_dir).f_frsize
    read: list[int] = []

    def chunks() -> Iterator[bytes]:
        read.append(1)
        yield b"x"

    size = free + (1 << 40)
    with pytest.raises(StoreError, match=f"no space for blob .*: it is {size} bytes"):
        store.ingest(Digest.of(b"x"), size, chunks())
    assert read == []  # not a byte copied
    _nothing_kept(store)


def test_a_full_disk_during_ingest_keeps_nothing_and_says_so(small_store: ContentStore) -> None:
    """It kept what fitted "for a later pull to resume": the file system stayed full."""
    data = os.urandom(2 << 20)
    with pytest.raises(StoreError, match="no space left for blob .*nothing of it was kept") as e:
        small_store.ingest(Digest.of(data), None, [data[: 1 << 19]] * 4)
    assert "resume" not in str(e.value)
    assert small_store.stale_ingests(older_than=0) == (0, 0)
    _nothing_kept(small_store)


def test_ingest_check_sees_the_verified_file_and_can_refuse_it(store: ContentStore) -> None:
    data = b"layer"
    seen: list[bytes] = []

    def refuse(path: Path) -> None:
        seen.append(path.read_bytes())
        raise SourceGone("not what the config says")

    with pytest.raises(SourceGone):
        store.ingest(Digest.of(data), len(data), [data], check=refuse)
    assert seen == [data]
    _nothing_kept(store)
    checked: list[Path] = []
    store.ingest(Digest.of(data), len(data), [data], check=checked.append)
    assert checked == [store.ingest_dir / f"sha256-{Digest.of(data).hex}"]
    assert store.read_bytes(Digest.of(data)) == data
