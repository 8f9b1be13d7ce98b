"""Reading a blob while its download writes it (``Download.open_arriving``).

A real content store and its real writer; the downloading thread is played by
the test, which writes, restarts, verifies and fails the blob at chosen moments.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ember.images.downloads import ArrivingBlob, BlobRestarted, Download
from ember.oci.digest import Digest
from ember.oci.errors import DigestMismatch
from ember.oci.manifest import Descriptor
from ember.store.content import BlobWriter, ContentStore

DATA = os.urandom(300_000)


@pytest.fixture()
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


def descriptor(data: bytes = DATA) -> Descriptor:
    return Descriptor(
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        digest=Digest.of(data),
        size=len(data),
    )


@contextmanager
def downloading(store: ContentStore, download: Download) -> Iterator[BlobWriter]:
    """The writer a registry download would use, followed by ``download``."""
    with store.writer(download.desc.digest, download.desc.size) as writer:
        writer.watch(download)
        yield writer


class Reader(threading.Thread):
    """Reads an arriving blob to its end in the background, as a layer applier does."""

    def __init__(self, blob: ArrivingBlob) -> None:
        super().__init__(daemon=True)
        self.blob = blob
        self.data = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while chunk := self.blob.read(65536):
                self.data += chunk
        except BaseException as e:
            self.error = e


def test_bytes_are_read_as_they_arrive_and_the_end_waits_for_the_digest(
    store: ContentStore,
) -> None:
    download = Download(descriptor(), None)
    with downloading(store, download) as writer:
        writer.write(DATA[:1000])
        blob = download.open_arriving()
        assert blob is not None
        assert blob.read(5000) == DATA[:1000]  # what is there, without waiting for the rest
        reader = Reader(blob)
        reader.start()
        writer.write(DATA[1000:])
        reader.join(0.3)
        assert reader.is_alive(), "the end of an unverified blob was read"
        writer.commit()
    download.finish(None)
    reader.join(10)
    assert not reader.is_alive() and reader.error is None
    assert DATA[:1000] + reader.data == DATA
    blob.close()
    download.close()


def test_a_download_that_starts_over_fails_its_reader(store: ContentStore) -> None:
    """The registry ignored a resume's Range: the writer empties the file and the whole
    body comes again.  The reader took up where it was once the bytes were back, but the
    digest checks the second body only: a registry that sent other bytes the first time
    had them handed out as verified.  Now the reader fails (BlobRestarted)."""
    download = Download(descriptor(), None)
    with downloading(store, download) as writer:
        writer.write(DATA[:50_000])
        blob = download.open_arriving()
        assert blob is not None
        assert blob.read(40_000) == DATA[:40_000]
        writer.reset()
        reader = Reader(blob)
        reader.start()
        writer.write(DATA)
        writer.commit()
    download.finish(None)
    reader.join(10)
    assert isinstance(reader.error, BlobRestarted) and reader.data == b""
    # a reader opened after the start-over reads it whole
    second = Download(descriptor(), None)
    with downloading(store, second) as writer:
        writer.write(DATA[:10])
        writer.reset()
        fresh = second.open_arriving()
        assert fresh is not None
        writer.write(DATA)
        writer.commit()
    second.finish(None)
    assert fresh.read() == DATA
    fresh.close()


def test_a_blob_that_fails_its_digest_raises_instead_of_ending(store: ContentStore) -> None:
    wrong = bytearray(DATA)
    wrong[-1] ^= 1
    download = Download(descriptor(), None)
    with downloading(store, download) as writer:
        blob = download.open_arriving()
        assert blob is not None
        reader = Reader(blob)
        reader.start()
        writer.write(bytes(wrong))
        with pytest.raises(DigestMismatch) as failed:
            writer.commit()
    download.finish(failed.value)  # what the download thread does with its error
    reader.join(10)
    # (the store emptied the file for the next try first: the download's error still wins)
    assert isinstance(reader.error, DigestMismatch)
    assert reader.data == bytes(wrong)[: len(reader.data)]  # never more than was written


def test_there_is_nothing_to_follow_once_a_download_has_ended(store: ContentStore) -> None:
    stored = Download(descriptor(), None)
    with downloading(store, stored) as writer:
        writer.write(DATA)
        writer.commit()
    stored.finish(None)
    assert stored.open_arriving() is None  # read the stored blob instead
    stored.close()

    failed = Download(descriptor(), None)
    failed.finish(RuntimeError("the registry went away"))
    assert failed.open_arriving() is None
    with pytest.raises(RuntimeError, match="went away"):
        failed.result()


def test_a_reader_waiting_for_a_download_to_start_is_let_go_when_the_pull_ends() -> None:
    download = Download(descriptor(), None)
    opened: list[ArrivingBlob | None] = []
    waiter = threading.Thread(target=lambda: opened.append(download.open_arriving()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    download.close()
    waiter.join(10)
    assert opened == [None]


def test_the_pull_ending_leaves_open_readers_their_own_descriptor(store: ContentStore) -> None:
    download = Download(descriptor(), None)
    with downloading(store, download) as writer:
        writer.write(DATA)
        blob = download.open_arriving()
        assert blob is not None
        download.close()  # a late reader may still be applying the layer
        writer.commit()
    download.finish(None)
    assert blob.read() == DATA
    blob.close()


def test_following_a_blob_leaves_its_lock_to_the_writers(store: ContentStore) -> None:
    """Another process's pull of the same blob waits on the ingest file's lock while a
    writer holds it, never longer: the two pulls of one image in two processes each
    followed blobs the other then waited for, and both waited for ever."""
    download = Download(descriptor(), None)
    with downloading(store, download) as writer:
        writer.write(DATA[:1000])
        ingest = writer.ingest_path
    # the writer stopped (a cut connection), its bytes kept for a resume; still followed
    fd = os.open(ingest, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if we still held it
    finally:
        os.close(fd)
        download.close()


def test_a_download_resuming_an_earlier_ones_bytes_is_not_followed(store: ContentStore) -> None:
    """Those bytes are checked only with the rest, and thrown away (the blob fetched
    again whole) when the whole does not match: a reader would have used them."""
    with store.writer(Digest.of(DATA), len(DATA)) as writer:
        writer.write(b"what an earlier, cancelled pull got")  # kept for a resume
    download = Download(descriptor(), None)
    opened: list[ArrivingBlob | None] = []
    waiter = threading.Thread(target=lambda: opened.append(download.open_arriving()))
    with downloading(store, download) as writer:
        waiter.start()
        assert writer.offset > 0
        waiter.join(0.2)
        assert waiter.is_alive()  # nothing to follow: it waits for the download to end
        writer.reset()
        writer.write(DATA)
        writer.commit()
    download.finish(None)
    waiter.join(10)
    assert opened == [None]  # read the stored blob
    download.close()


def test_an_applier_stopped_by_bad_bytes_reports_the_download_failing(
    store: ContentStore, tmp_path: Path
) -> None:
    """A tar header mangled on the way stops the applier child at once; the download's
    error (its digest fails at the end) is what happened, and what the user reads,
    rather than the child's "invalid tar header"."""
    from ember.oci import mediatypes as mt
    from ember.unpack import apply_layers

    expected = os.urandom(4 << 20)
    mangled = b"\xff" * 512 + bytes(3 << 20)  # more than the pipe holds: the child must read
    download = Download(descriptor(expected), None)
    root = tmp_path / "root"
    root.mkdir()
    failures: list[BaseException] = []

    def apply() -> None:
        try:
            apply_layers(
                root, [(tmp_path / "layer", mt.OCI_LAYER_TAR, Digest.of(expected))],
                opener=lambda _i: download.open_arriving(),
            )  # fmt: skip
        except BaseException as e:
            failures.append(e)

    with downloading(store, download) as writer:
        writer.write(mangled)
        applying = threading.Thread(target=apply)
        applying.start()
        applying.join(0.5)
        assert applying.is_alive()  # the child has stopped; the parent waits for the end
        with pytest.raises(DigestMismatch) as failed:
            writer.commit()
    download.finish(failed.value)
    applying.join(30)
    assert len(failures) == 1 and isinstance(failures[0], DigestMismatch), failures
    download.close()


def test_an_applier_failing_on_an_earlier_layer_does_not_wait_for_the_next_download(
    store: ContentStore, tmp_path: Path
) -> None:
    """The child refused layer 0 (stored, verified) while layer 1 still arrives: its error
    is raised at once, not after layer 1's download ends (which here it never does)."""
    from ember.oci import mediatypes as mt
    from ember.unpack import InvalidLayer, apply_layers

    refused = b"\xff" * 1024  # not a tar header
    (tmp_path / "layer0").write_bytes(refused)
    expected = os.urandom(4 << 20)
    download = Download(descriptor(expected), None)
    root = tmp_path / "root"
    root.mkdir()
    failures: list[BaseException] = []
    with downloading(store, download) as writer:
        writer.write(bytes(3 << 20))  # more than a pipe holds: the parent meets the dead child

        def apply() -> None:
            try:
                apply_layers(
                    root,
                    [(tmp_path / "layer0", mt.OCI_LAYER_TAR, Digest.of(refused)),
                     (tmp_path / "layer1", mt.OCI_LAYER_TAR, Digest.of(expected))],
                    opener=lambda i: download.open_arriving() if i == 1 else None,
                )
            except BaseException as e:
                failures.append(e)

        applying = threading.Thread(target=apply)
        applying.start()
        applying.join(30)
        alive = applying.is_alive()
        download.finish(RuntimeError("the test ends the download"))  # lets a waiting reader go
        applying.join(30)
    download.close()
    assert not alive, "the child's error for layer 0 waited for layer 1's download"
    assert len(failures) == 1 and isinstance(failures[0], InvalidLayer), failures
