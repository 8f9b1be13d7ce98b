"""The content store: verified, atomic, resumable, safe under concurrent writers."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import threading
from pathlib import Path

import pytest

from ember.oci.digest import Digest
from ember.oci.errors import DigestMismatch
from ember.store.content import ContentStore
from ember.store.errors import BlobNotFound, DamagedBlob, StoreError
from tests.support.proc import flock_waiters, poll_until


@pytest.fixture()
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


def test_put_and_read_back(store: ContentStore) -> None:
    d = store.put_bytes(b"hello")
    assert d == Digest.of(b"hello")
    assert store.read_bytes(d) == b"hello"
    assert store.size(d) == 5
    assert list(store.list()) == [d]


def test_put_with_wrong_expected_digest_stores_nothing(store: ContentStore) -> None:
    with pytest.raises(DigestMismatch):
        store.put_bytes(b"hello", Digest.of(b"other"))
    assert list(store.list()) == []


def test_wrong_claim_is_refused_even_when_the_claimed_blob_exists(store: ContentStore) -> None:
    d = store.put_bytes(b"real")
    with pytest.raises(DigestMismatch):
        store.put_bytes(b"fake", d)
    assert store.read_bytes(d) == b"real"


def test_missing_blob_is_a_clear_error(store: ContentStore) -> None:
    with pytest.raises(BlobNotFound, match="not in the content store"):
        store.open(Digest.of(b"x"))


def test_sha512_blobs(store: ContentStore) -> None:
    d = Digest.of(b"data", "sha512")
    store.put_bytes(b"data", d)
    assert store.path(d).parent.name == "sha512"
    assert store.read_bytes(d) == b"data"


def test_size_mismatch_is_refused_and_partial_discarded(store: ContentStore) -> None:
    data = b"0123456789"
    d = Digest.of(data)
    with store.writer(d, 11) as w, pytest.raises(DigestMismatch):
        w.write(data)
        w.commit()
    assert not store.exists(d)


def test_too_many_bytes_fail_early(store: ContentStore) -> None:
    d = Digest.of(b"abc")
    with store.writer(d, 3) as w, pytest.raises(DigestMismatch, match="larger"):
        w.write(b"abcd")
    assert not store.exists(d)


def test_interrupted_write_resumes_from_offset(store: ContentStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    d = Digest.of(data)
    with store.writer(d, len(data)) as w:
        w.write(data[:1_000_000])  # then "crash": no commit
    assert not store.exists(d)
    with store.writer(d, len(data)) as w:
        assert w.offset == 1_000_000
        w.write(data[w.offset :])
        w.commit()
    assert store.read_bytes(d) == data


def test_corrupt_partial_content_is_caught_at_commit(store: ContentStore) -> None:
    data = b"a" * 100
    d = Digest.of(data)
    with store.writer(d, len(data)) as w:
        w.write(b"b" * 50)
    with store.writer(d, len(data)) as w, pytest.raises(DigestMismatch):
        w.write(data[w.offset :])
        w.commit()
    assert not store.exists(d)
    # the bad partial content was discarded: a fresh writer starts at zero
    with store.writer(d, len(data)) as w:
        assert w.offset == 0


def test_committed_blob_is_read_only_and_ingest_is_gone(store: ContentStore) -> None:
    d = store.put_bytes(b"content")
    assert store.path(d).stat().st_mode & 0o777 == 0o444
    assert list(store.ingest_dir.iterdir()) == []


def test_prune_ingests_removes_only_old_unlocked_partials(store: ContentStore) -> None:
    d1, d2 = Digest.of(b"one"), Digest.of(b"two")
    with store.writer(d1, 3) as w:
        w.write(b"o")
    old = store.ingest_dir / f"sha256-{d1.hex}"
    os.utime(old, (1, 1))
    with store.writer(d2, 3) as w:
        w.write(b"t")
        os.utime(w.ingest_path, (1, 1))
        # held by a live writer: must survive
        assert store.prune_ingests(older_than=60) == 1
    assert not old.exists()


def test_prune_ingests_never_unlinks_a_file_made_under_the_name_since_it_looked(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pruners (the registry's purge and its gc): the other removed the old partial
    write this one had opened, and a writer made a new one under the name before this
    one locked its (gone) file; that new file was unlinked under the writer."""
    import fcntl

    d = Digest.of(b"one")
    with store.writer(d, 3) as w:
        w.write(b"o")
    path = store.ingest_dir / f"sha256-{d.hex}"
    os.utime(path, (1, 1))
    real_flock = fcntl.flock

    def the_other_pruner_and_a_writer_come_first(fd: int, op: int) -> None:
        path.unlink()
        path.write_bytes(b"a new write")
        real_flock(fd, op)

    monkeypatch.setattr("ember.store.content.fcntl.flock", the_other_pruner_and_a_writer_come_first)
    assert store.prune_ingests(older_than=60) == 0
    assert path.read_bytes() == b"a new write"


def _write_same_blob(root: str, data: bytes) -> None:
    s = ContentStore(Path(root))
    s.put_bytes(data)


def test_concurrent_writers_of_one_blob(tmp_path: Path) -> None:
    data = os.urandom(4 * 1024 * 1024)
    root = tmp_path / "content"
    ContentStore(root)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_same_blob, args=(str(root), data)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    s = ContentStore(root)
    assert s.read_bytes(Digest.of(data)) == data
    assert list(s.ingest_dir.iterdir()) == []


def test_ingest_keeps_nothing_of_a_bad_stream(store: ContentStore) -> None:
    d = Digest.of(b"abc")
    with pytest.raises(DigestMismatch):
        store.ingest(d, 3, [b"ab", b"cd"])
    assert not store.exists(d)
    assert list(store.ingest_dir.iterdir()) == []
    seen: list[int] = []
    store.ingest(d, 3, [b"a", b"bc"], seen.append)
    assert store.read_bytes(d) == b"abc" and seen == [1, 2]


def test_batch_defers_directory_sync_to_its_end(store: ContentStore) -> None:
    """Inside a batch, committed blobs are visible and complete at once; the
    directory that names them is synced once, when the outermost batch ends."""
    import threading

    blobs = [f"blob {i}".encode() for i in range(6)]
    with store.batch():
        with store.batch():  # nested: only the outermost end syncs
            workers = [threading.Thread(target=store.put_bytes, args=(b,)) for b in blobs]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        for b in blobs:
            assert store.read_bytes(Digest.of(b)) == b
        assert store._unsynced == {store.blobs / "sha256"}
    assert store._unsynced == set()
    assert sorted(store.list()) == sorted(Digest.of(b) for b in blobs)


def test_batch_ending_in_an_error_still_syncs_what_it_published(store: ContentStore) -> None:
    with pytest.raises(RuntimeError), store.batch():
        store.put_bytes(b"kept")
        raise RuntimeError("pull failed")
    assert store._unsynced == set()
    assert store.read_bytes(Digest.of(b"kept")) == b"kept"


def test_a_blob_damaged_after_it_was_stored_is_blamed_and_removed(store: ContentStore) -> None:
    intact, damaged = store.put_bytes(b"intact"), store.put_bytes(b"damaged")
    path = store.path(damaged)
    path.chmod(0o644)
    path.write_bytes(b"changed on disk")
    assert store.matches(intact) and not store.matches(damaged)
    store.raise_if_damaged([intact], ValueError("x"))  # nothing to blame: returns
    with pytest.raises(DamagedBlob, match=f"blob {damaged} in the content store .*: boom") as e:
        store.raise_if_damaged([intact, damaged], ValueError("boom"))
    assert e.value.hint and "again" in e.value.hint
    assert not store.exists(damaged) and store.exists(intact)
    assert not store.matches(damaged)  # missing: no match, no error


def _damage(store: ContentStore, digest: Digest, data: bytes) -> None:
    """What a torn write or disk damage leaves: other bytes under the blob's name."""
    path = store.path(digest)
    path.chmod(0o644)
    path.write_bytes(data)


def test_put_bytes_replaces_a_damaged_stored_copy(store: ContentStore) -> None:
    """A manifest stored over a damaged copy of itself was skipped ("the store has it"):
    the pull said it succeeded, and the next command said the image was damaged."""
    manifest = b'{"schemaVersion": 2}'
    d = store.put_bytes(manifest)
    _damage(store, d, b"{}")
    assert store.put_bytes(manifest, d) == d
    assert store.read_bytes(d) == manifest and store.matches(d)
    assert store.stale_ingests(older_than=0) == (0, 0)  # nothing left in ingest/


def test_size_for_reuse_hashes_what_it_cannot_trust(store: ContentStore) -> None:
    from ember.store.content import REHASH_LIMIT

    small = b"small blob"
    d = store.put_bytes(small)
    assert store.size_for_reuse(d, len(small)) == len(small)  # intact: reused
    assert store.size_for_reuse(d, 4 << 30) == len(small)  # intact: the descriptor lies
    assert store.size_for_reuse(Digest.of(b"absent"), 6) is None
    _damage(store, d, b"smalL blob")  # one bit flipped, the same size
    assert store.size_for_reuse(d, len(small)) is None  # small: hashed, damaged, removed
    assert not store.exists(d)

    big = os.urandom(REHASH_LIMIT + 1)
    b = store.put_bytes(big)
    torn = big[: len(big) // 2]
    _damage(store, b, torn)
    assert store.size_for_reuse(b, len(big)) is None  # its size says so: hashed, removed
    assert not store.exists(b)
    store.put_bytes(big)
    _damage(store, b, bytes(len(big)))
    # the same size: trusted unread (a pull must not hash every stored layer); its
    # DiffID is checked where it is applied (raise_if_damaged)
    assert store.size_for_reuse(b, len(big)) == len(big)


def test_a_damaged_blob_is_not_removed_under_a_writer_putting_a_good_copy_there(
    store: ContentStore,
) -> None:
    """raise_if_damaged unlinked the blob's name after hashing it: a pull that had just
    replaced the damaged copy with a good one (and was about to record the image) lost
    it.  The removal now waits for the blob's writer and looks again."""
    good = b"layer bytes"
    d = store.put_bytes(good)
    _damage(store, d, b"layer")
    errors: list[BaseException] = []

    def blame() -> None:
        try:
            store.raise_if_damaged([d], ValueError("unexpected end of data"))
        except BaseException as e:  # noqa: BLE001 (checked below)
            errors.append(e)

    with store.writer(d, len(good)) as w:  # a pull fetching it again
        remover = threading.Thread(target=blame)
        remover.start()
        ingest = w.ingest_path
        poll_until(
            lambda: not remover.is_alive() or os.getpid() in flock_waiters(ingest),
            "the remover to end or wait for the writer",
        )
        assert remover.is_alive(), f"removed without waiting for the writer: {errors}"
        w.write(good)
        w.commit()
    remover.join()
    assert errors == []  # a good copy by then: nothing to blame
    assert store.read_bytes(d) == good
    assert not ingest.exists()


def test_a_symlink_planted_in_ingest_is_refused_not_written_through(
    store: ContentStore, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"not ember's " * 100)
    mode = victim.stat().st_mode
    d = Digest.of(b"blob")
    os.symlink(victim, store.ingest_dir / f"sha256-{d.hex}")
    with pytest.raises(StoreError, match="not a regular file.*remove it"):
        store.put_bytes(b"blob", d)
    assert victim.read_bytes() == b"not ember's " * 100  # neither truncated nor overwritten
    assert victim.stat().st_mode == mode
    assert not store.exists(d) and not store.path(d).is_symlink()


def test_prune_ingests_leaves_what_is_not_a_regular_file(store: ContentStore) -> None:
    odd = store.ingest_dir / "sha256-odd"
    odd.mkdir()
    os.utime(odd, (0, 0))
    stale = store.ingest_dir / "sha256-stale"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    assert store.prune_ingests(older_than=60) == 1  # no IsADirectoryError from gc
    assert odd.is_dir() and not stale.exists()


def test_a_full_disk_names_the_blob_and_how_to_free_the_partial(tmp_path: Path) -> None:
    """It said only "No space left on device"; the partial download then filled the disk
    for an hour (gc keeps partial downloads that long unless told otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        store = ContentStore(mnt / "content")
        data = os.urandom(2 << 20)
        d = Digest.of(data)
        with pytest.raises(StoreError, match="no space left for blob") as err, store.writer(d, len(data)) as w:
            w.write(data)
        assert "ember gc --ingest-grace 0" in str(err.value)
        count, size = store.stale_ingests(older_than=0)
        assert count == 1 and 0 < size < len(data)  # what fitted, kept for a resume
        assert store.stale_ingests(older_than=0, remove=True)[0] == 1
        assert store.stale_ingests(older_than=0) == (0, 0)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_sync_names_makes_the_named_blobs_names_durable_too(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull that found every blob already there (renamed into place by a concurrent
    pull that had not synced their directory yet) recorded its image with no directory
    fsync of its own: after a crash the record could name blobs whose names were lost."""
    import ember.store.content as content_module

    other = ContentStore(store.root)  # the other pull's
    with other.batch():  # its directory fsync comes at the end of its batch
        digest = other.put_bytes(b"a layer")
        synced: list[Path] = []
        real = content_module.fsync_dir
        monkeypatch.setattr(content_module, "fsync_dir", lambda d: (synced.append(Path(d)), real(d)))
        store.sync_names()  # nothing of its own
        assert synced == []
        store.sync_names([digest])
        assert synced == [store.path(digest).parent]
