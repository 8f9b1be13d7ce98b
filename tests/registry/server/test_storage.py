"""Upload sessions on a real filesystem, as several server processes see them:
two BlobStorage objects over one root stand for two workers (or one server
before and after a restart), each with its own in-memory hash state."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ember.oci.digest import Digest
from ember.registry.server.errors import ApiError
from ember.registry.server.storage import BlobStorage


async def _body(data: bytes, piece: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


def _append(store: BlobStorage, session: str, data: bytes, start: int | None) -> int:
    return asyncio.run(store.append(session, _body(data), start))


def test_sessions_move_between_processes(tmp_path: Path) -> None:
    a, b = BlobStorage(tmp_path), BlobStorage(tmp_path)
    data = os.urandom(3_500_000)
    cuts = [0, 1_000_000, 2_100_000, 2_900_000, len(data)]
    a.create_session("s1")
    writers = [b, a, b, a]  # every chunk lands on the other process
    for store, lo, hi in zip(writers, cuts[:-1], cuts[1:], strict=True):
        assert _append(store, "s1", data[lo:hi], lo) == hi
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    assert b.publish("s1", digest) == len(data)
    assert a.content.path(digest).read_bytes() == data
    assert a.content.path(digest).stat().st_mode & 0o777 == 0o444
    assert a.session_size("s1") is None


def test_restart_resumes_and_verifies(tmp_path: Path) -> None:
    before = BlobStorage(tmp_path)
    data = os.urandom(2_000_000)
    before.create_session("s2")
    _append(before, "s2", data[:1_234_567], 0)
    after = BlobStorage(tmp_path)  # no memory of the session's hash
    assert after.session_size("s2") == 1_234_567
    _append(after, "s2", data[1_234_567:], 1_234_567)
    wrong = Digest("sha256", "0" * 64)
    with pytest.raises(ApiError) as e:
        after.publish("s2", wrong)
    assert e.value.code == "DIGEST_INVALID"
    assert not after.content.path(wrong).exists() and after.session_size("s2") == len(data)
    d512 = Digest("sha512", hashlib.sha512(data).hexdigest())
    assert after.publish("s2", d512) == len(data)
    assert after.content.path(d512).read_bytes() == data


def test_out_of_order_chunk_and_concurrent_writer(tmp_path: Path) -> None:
    store = BlobStorage(tmp_path)
    store.create_session("s3")
    _append(store, "s3", b"abc", 0)
    with pytest.raises(ApiError) as e:
        _append(store, "s3", b"def", 10)
    assert e.value.status == 416 and store.session_size("s3") == 3

    async def two_writers() -> list[object]:
        gate = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield b"x"
            await gate.wait()
            yield b"y"

        first = asyncio.create_task(store.append("s3", slow(), None))
        await asyncio.sleep(0)  # the first writer runs until it waits for more body, holding the lock
        second = await asyncio.gather(store.append("s3", _body(b"zz"), None), return_exceptions=True)
        gate.set()
        return [await first, *second]

    first, second = asyncio.run(two_writers())
    assert first == 5
    assert isinstance(second, ApiError) and second.status == 416
    digest = Digest("sha256", hashlib.sha256(b"abcxy").hexdigest())
    assert store.publish("s3", digest) == 5


def test_writers_wait_for_a_gc_sweep(tmp_path: Path) -> None:
    store = BlobStorage(tmp_path)
    entered: list[str] = []

    async def writer() -> None:
        async with store.publishing():
            entered.append("writer")

    async def scenario() -> None:
        with store.collecting():  # a sweep in progress (another process in real life)
            task = asyncio.create_task(writer())
            for _ in range(5):
                await asyncio.sleep(0)
            assert entered == [] and not task.done()  # held off while the lock is held
        await task
        assert entered == ["writer"]

    asyncio.run(scenario())


def test_a_session_in_use_is_not_dropped_under_it(tmp_path: Path) -> None:
    """DELETE (or GC) while another request publishes the session: refused, not a
    vanished file under the publisher (which then answered 500)."""
    a, b = BlobStorage(tmp_path), BlobStorage(tmp_path)
    data = os.urandom(10_000)
    a.create_session("s3")
    _append(a, "s3", data, 0)
    with a._locked("s3", os.O_RDONLY):  # what publish and append hold while they work
        with pytest.raises(ApiError) as e:
            b.drop_session("s3")
        assert (e.value.code, e.value.status) == ("BLOB_UPLOAD_INVALID", 409)
        assert not b.drop_session_if_idle("s3")
        assert b.session_size("s3") == len(data)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    assert a.publish("s3", digest) == len(data)
    b.drop_session("s3")  # gone already: no error
    assert b.drop_session_if_idle("s3")


def test_a_session_dropped_between_open_and_lock_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that opened the session file just before another one deleted it must
    not write into (or publish) the deleted file."""
    store = BlobStorage(tmp_path)
    store.create_session("s4")
    import ember.registry.server.storage as storage_module

    real_flock = storage_module.fcntl.flock

    def flock_after_a_drop(fd: int, op: int) -> None:
        os.unlink(store.session_path("s4"))  # the concurrent DELETE, between open and lock
        real_flock(fd, op)

    monkeypatch.setattr(storage_module.fcntl, "flock", flock_after_a_drop)
    with pytest.raises(ApiError) as e:
        _append(store, "s4", b"late bytes", 0)
    assert e.value.code == "BLOB_UPLOAD_UNKNOWN"


def test_a_write_that_fails_after_a_short_one_writes_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short write, then ENOSPC: the flush on the way out wrote the whole buffer again,
    so the file held the short write's bytes twice while the session's size was taken
    for the offset (and releasing the buffer's views failed with BufferError)."""
    from ember.registry.server import storage as storage_module

    store = BlobStorage(tmp_path)
    store.create_session("s")
    data = os.urandom(1 << 20)
    real_write = os.write
    calls = iter(["short", "full"])

    def failing_write(fd: int, view: memoryview) -> int:
        step = next(calls, "ok")
        if step == "short":
            return real_write(fd, view[:1000])
        if step == "full":
            raise OSError(28, "No space left on device")
        return real_write(fd, view)

    monkeypatch.setattr(storage_module.os, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        _append(store, "s", data, 0)
    monkeypatch.undo()
    size = store.session_size("s")
    assert size == len(data)  # the flush on the way out wrote the rest once
    assert store.session_path("s").read_bytes() == data
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    assert store.publish("s", digest) == len(data)
