"""What the server keeps in bounds by itself: expired upload sessions purged
periodically (``--upload-purge-interval``), open upload sessions and repositories
capped per organization (``--max-uploads``, ``--max-repositories``)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import click
import httpx
import pytest
from sqlalchemy.dialects import sqlite as sqlite_dialect

from ember.locks import FileLock
from ember.oci.digest import Digest
from ember.registry.server.config import ServerLimits, limits_from_env
from ember.registry.server.context import RequestContext
from ember.registry.server.dbcalls import DbCalls
from ember.registry.server.errors import RegistryError
from ember.registry.server.gc import purge
from ember.registry.server.metadata import _OPEN_UPLOADS, RegistryMetadata
from ember.registry.server.quota import RETRY_AFTER_MAX, Quotas
from ember.registry.server.storage import BlobStorage
from ember.registry.server.tokens import Grant
from ember.registry.server.uploads import Uploads
from ember.registry.server.uploadstate import (
    UPLOAD_TTL,
    InvalidUploadState,
    UploadState,
    sign_state,
    verify_state,
)
from tests.registry.server.support import (
    EMBER,
    OCI_INDEX,
    EmberServer,
    Tenant,
    at,
    ember,
    push_blob,
    send_partial,
    sha256,
)
from tests.support.images import layout_ref
from tests.support.proc import read_line

pytestmark = pytest.mark.integration

#: a purge interval short enough for a test to see several purges
QUICK = "0.2"


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., EmberServer]]:
    """Servers with options, over one state directory (several: replicas), stopped at
    the end; the organization ``acme`` exists."""
    started: list[EmberServer] = []
    home = tmp_path / "home"
    ember(home, "admin", "org", "create", "acme")

    def make(*options: str, workers: int | None = None) -> EmberServer:
        srv = EmberServer(home, options=list(options))
        if workers is not None:
            srv.workers = workers
        started.append(srv.start())
        return srv

    yield make
    for srv in started:
        srv.stop()


def _db(srv: EmberServer) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(srv.home / "ember.db", isolation_level=None))


def _expire(srv: EmberServer, *sessions: str) -> None:
    """As if 24 h had passed since these sessions started."""
    with _db(srv) as db:
        for session in sessions:
            db.execute("UPDATE reg_uploads SET expires_at = ? WHERE id = ?", (time.time() - 1, session))


def _opened_ago(srv: EmberServer, seconds: float, *sessions: str) -> None:
    """As if these sessions had started ``seconds`` ago (still unexpired)."""
    with _db(srv) as db:
        for session in sessions:
            expires = time.time() + UPLOAD_TTL - seconds
            db.execute("UPDATE reg_uploads SET expires_at = ? WHERE id = ?", (expires, session))


def _opened_an_hour_ago(srv: EmberServer, *sessions: str) -> None:
    _opened_ago(srv, 3601, *sessions)


def _sessions(srv: EmberServer) -> set[str]:
    with _db(srv) as db:
        return {r[0] for r in db.execute("SELECT id FROM reg_uploads")}


def _repos(srv: EmberServer) -> set[str]:
    with _db(srv) as db:
        return {r[0] for r in db.execute("SELECT name FROM reg_repos")}


def _uploads_dir(srv: EmberServer) -> Path:
    return srv.home / "registry" / "uploads"


def _wait_for(what: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _last_purge(srv: EmberServer) -> float:
    """When the last purge of the server (or of any over its state directory) began, as
    its purge lock file says (0: none yet, or the file is being rewritten)."""
    try:
        return float((srv.home / "registry" / "purge.lock").read_text())
    except (OSError, ValueError):
        return 0.0


def _purges_run(srv: EmberServer, count: int = 1) -> None:
    """Until ``count`` purges that began after this call have run to their end (purges
    with nothing to do included; each records when it began as it ends)."""
    for _ in range(count):
        _purge_after(srv, time.time())


def _purge_after(srv: EmberServer, since: float) -> None:
    _wait_for(lambda: _last_purge(srv) > since)


def _purged(srv: EmberServer) -> tuple[int, int, int]:
    """(sessions, bytes, repositories) that the server's log says its purges removed."""
    found = re.findall(
        r"purged (\d+) expired upload sessions \((\d+) bytes\) and (\d+) empty repositories",
        srv.log_path.read_text(),
    )
    return (sum(int(f[0]) for f in found), sum(int(f[1]) for f in found), sum(int(f[2]) for f in found))


def _start(c: httpx.Client, repo: str) -> tuple[str, str]:
    """A new upload session: (its id, its URL)."""
    r = c.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    return r.headers["Docker-Upload-UUID"], r.headers["Location"]


@contextlib.contextmanager
def _appending(t: Tenant, location: str) -> Iterator[Callable[[], int | None]]:
    """A PATCH whose body is still arriving (the server holds the session's lock):
    1 MiB sent (written: the server writes in 1 MiB batches), the rest when the block
    ends; yields the function that returns the PATCH's status after that."""
    go_on = threading.Event()
    first = b"x" * (1 << 20)

    def body() -> Iterator[bytes]:
        yield first
        go_on.wait(30)
        yield b"y" * 10

    with t.client() as c, ThreadPoolExecutor(1) as pool:
        job = pool.submit(lambda: c.patch(location, content=body()).status_code)
        session = location.split("/uploads/")[1].split("?")[0]
        _wait_for(lambda: (_uploads_dir(t.server) / session).stat().st_size >= len(first))
        try:
            yield job.result
        finally:
            go_on.set()
            job.result()


def test_the_server_purges_expired_uploads_by_itself(start: Callable[..., EmberServer]) -> None:
    """Expired sessions stayed on disk and in the database until an administrator ran
    `ember admin registry gc`; now the server deletes them (and empty repositories),
    never a session still in use."""
    srv = start("--upload-purge-interval", QUICK)
    t = Tenant(srv, "acme", srv.create_token("acme"))
    uploads = _uploads_dir(srv)
    with t.client() as c:
        gone, loc = _start(c, "a")
        assert c.patch(loc, content=b"g" * 5000).status_code == 202
        empty, _ = _start(c, "a")
        live, live_loc = _start(c, "a")
        live_loc = c.patch(live_loc, content=b"live").headers["Location"]
        busy, busy_loc = _start(c, "b")
        # repositories: one an upload was started and cancelled in long ago, one just now
        _, cancelled = _start(c, "old-empty")
        assert c.delete(cancelled).status_code == 204
        _, cancelled = _start(c, "new-empty")
        assert c.delete(cancelled).status_code == 204
    with _db(srv) as db:
        db.execute("UPDATE reg_repos SET created_at = ? WHERE name IN ('acme/old-empty', 'acme/a')",
                   (time.time() - 7200,))  # fmt: skip
    # files no session names: one left by a crash long ago, one of a moment ago
    crashed, starting = uploads / ("0" * 32), uploads / ("1" * 32)
    crashed.write_bytes(b"crash")
    os.utime(crashed, (time.time() - 7200,) * 2)
    starting.write_bytes(b"new")
    with _appending(t, busy_loc) as status:
        _expire(srv, gone, empty, busy)
        _wait_for(lambda: not {gone, empty} & _sessions(srv))
        assert not (uploads / gone).exists() and not (uploads / empty).exists()
        _wait_for(lambda: not crashed.exists())
        _wait_for(lambda: "acme/old-empty" not in _repos(srv))
        _purges_run(srv, 2)  # more purges: the session being appended to stays
        assert busy in _sessions(srv) and (uploads / busy).exists()
    assert status() == 202  # its request began before the expiry and ends normally
    _wait_for(lambda: busy not in _sessions(srv) and not (uploads / busy).exists())
    assert _repos(srv) == {"acme/a", "acme/b", "acme/new-empty"}  # young, or not empty
    assert starting.exists()  # within the grace period: maybe a session starting
    with t.client() as c:  # the unexpired one goes on
        assert c.get(live_loc).status_code == 204
        assert c.put(at(live_loc, digest=sha256(b"live"))).status_code == 201
    # the purge that removed the busy session logs it after that: wait for its line
    _wait_for(lambda: _purged(srv)[0] >= 4)
    sessions, size, repositories = _purged(srv)
    assert (sessions, size, repositories) == (4, 5000 + 5 + (1 << 20) + 10, 1), srv.log_tail()


def test_one_purge_at_a_time_and_none_during_gc(start: Callable[..., EmberServer]) -> None:
    """Replicas over one state directory (each with its timer) purge one at a time, each
    session once; while `ember admin registry gc` sweeps, no purge runs."""
    a = start("--upload-purge-interval", QUICK)
    b = start("--upload-purge-interval", QUICK)
    t = Tenant(a, "acme", a.create_token("acme"))
    storage = BlobStorage(a.home / "registry")
    with t.client() as c:
        first = [_start(c, f"r{i % 3}")[0] for i in range(15)]
        second = [_start(c, f"r{i % 3}")[0] for i in range(15)]
    for lock, sessions in ((_held(storage.purge_lock), first),  # as while another process purges
                           (storage.collecting(), second)):  # what a gc holds while it sweeps
        with lock:
            _expire(a, *sessions)
            time.sleep(1.0)  # several purge intervals of both servers
            assert set(sessions) <= _sessions(a)
            assert all((_uploads_dir(a) / s).exists() for s in sessions)
        _wait_for(lambda: not set(sessions) & _sessions(a))  # noqa: B023 - called at once
        assert not any((_uploads_dir(a) / s).exists() for s in sessions)
    # a purge logs what it removed just after removing it: wait for the 30 in the log,
    # then give a second count of some session (the bug) one more purge to show in
    _wait_for(lambda: _purged(a)[0] >= 30)
    _purges_run(a)
    assert _purged(a)[0] == 30, a.log_tail()  # a and b share the log: each session once
    # a gc at the same time as the purges: each does its part, nothing fails
    with t.client() as c:
        more = [_start(c, "r0")[0] for _ in range(20)]
        _expire(a, *more)
        report = json.loads(ember(a.home, "admin", "registry", "gc", "--json").stdout)
    _wait_for(lambda: not set(more) & _sessions(a))
    _wait_for(lambda: _purged(a)[0] + report["uploads"] >= 50)
    _purges_run(a)
    assert _purged(a)[0] + report["uploads"] == 50
    assert "Traceback" not in a.log_path.read_text()
    assert b.process is not None and b.process.poll() is None


@contextlib.contextmanager
def _held(lock: Path) -> Iterator[None]:
    """``lock`` held exclusively by this process."""
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def test_a_purge_skips_when_another_process_just_purged(tmp_path: Path) -> None:
    """Every worker (and replica) runs the timer: after one purged, the others skip until
    half an interval has passed, rather than each sweeping again."""
    meta = RegistryMetadata(f"sqlite:///{tmp_path / 'registry.db'}")
    meta.create_org("acme")
    storage = BlobStorage(tmp_path / "registry")
    first = purge(meta, storage, 60)
    assert first is not None and first.uploads.sessions == 0
    for session in ("a" * 32, "b" * 32):
        meta.create_upload("acme", "acme/r", session, time.time() - 1)
        storage.create_session(session)
    assert purge(meta, storage, 60) is None  # 60 s apart: another process did it
    with _held(storage.purge_lock):  # another process purges now
        assert purge(meta, storage, 0.2) is None
    time.sleep(0.1)
    report = purge(meta, storage, 0.2)
    assert report is not None and report.uploads.sessions == 2
    assert list(storage.uploads.iterdir()) == []


def test_a_purge_cannot_take_the_repository_of_a_session_being_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new session's repository was looked up, and the session's row that names it
    written, without the GC lock: a purge between the two deleted the repository (still
    empty: an upload started and cancelled an hour ago) and the insert failed on its
    foreign key, a 500.  The purge runs here exactly there, from the lookup; it must
    leave the repository to its next run.  (No limit on open sessions: with one, on
    SQLite, the organization's lock taken first held the purge's delete off.)"""
    meta = RegistryMetadata(f"sqlite:///{tmp_path / 'registry.db'}")
    meta.create_org("acme")
    meta.ensure_repo("acme", "acme/r")
    storage = BlobStorage(tmp_path / "registry")
    reports = []
    lookup = meta._repo_id

    def lookup_then_purge(conn: Any, full: str) -> int | None:
        found = lookup(conn, full)
        if found is not None and not reports:
            reports.append(purge(meta, storage, 60, grace=0, at_start=True))
        return found

    monkeypatch.setattr(meta, "_repo_id", lookup_then_purge)

    async def open_session() -> int:
        db = DbCalls(meta)
        limits = ServerLimits(max_uploads=0, max_repositories=0)
        uploads = Uploads(meta, storage, db, Quotas(meta, db, limits), limits, b"k" * 32)
        ctx = RequestContext(cast(Any, None), cast(Any, None), Grant("acme", "t"), False, "acme/r")
        return await uploads._open_session(ctx, "a" * 32, int(time.time()) + UPLOAD_TTL)

    repo_id = asyncio.run(open_session())
    (report,) = reports
    assert report is not None and report.repositories == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as db:
        assert db.execute("SELECT repo_id FROM reg_uploads").fetchall() == [(repo_id,)]
        assert db.execute("SELECT name FROM reg_repos WHERE id = ?", (repo_id,)).fetchall() == [("acme/r",)]
    # the purge after it, with the session open, leaves the repository too
    report = purge(meta, storage, 60, grace=0, at_start=True)
    assert report is not None and report.repositories == 0


def test_gc_keeps_an_expired_session_a_request_still_appends_to(start: Callable[..., EmberServer]) -> None:
    """GC deleted the rows of expired sessions first and their files only if idle: a
    session still being appended to lost its row (and its repository could go)."""
    srv = start("--upload-purge-interval", "0")
    t = Tenant(srv, "acme", srv.create_token("acme"))
    with t.client() as c:
        busy, loc = _start(c, "only")
    with _appending(t, loc) as status:
        _expire(srv, busy)
        report = json.loads(ember(srv.home, "admin", "registry", "gc", "--grace", "0", "--json").stdout)
        assert (report["uploads"], report["repositories"]) == (0, 0)
        assert busy in _sessions(srv) and "acme/only" in _repos(srv)
    assert status() == 202
    report = json.loads(ember(srv.home, "admin", "registry", "gc", "--grace", "0", "--json").stdout)
    assert (report["uploads"], report["repositories"]) == (1, 1)
    assert busy not in _sessions(srv) and not (_uploads_dir(srv) / busy).exists()


def _held_bytes(srv: EmberServer, session: str) -> int | None:
    """What the session's row holds under its organization's quota (None: no row)."""
    with _db(srv) as db:
        row = db.execute("SELECT held_bytes FROM reg_uploads WHERE id = ?", (session,)).fetchone()
    return None if row is None else int(row[0])


def _org_use(srv: EmberServer, org: str) -> tuple[int, int]:
    """(used_bytes, upload_bytes) as `ember admin org ls` says."""
    rows = json.loads(ember(srv.home, "admin", "org", "ls", "--json").stdout)
    (row,) = [r for r in rows if r["name"] == org]
    return int(row["used_bytes"]), int(row["upload_bytes"])


def _recovered(srv: EmberServer) -> tuple[int, int, int]:
    """(sessions whose file was gone, reservations cut, partial manifest writes) that
    the server's log says its purges recovered."""
    found = re.findall(
        r"recovered from interrupted requests: (\d+) upload sessions whose file was gone, "
        r"(\d+) upload reservations cut to what their file holds, (\d+) partial manifest writes",
        srv.log_path.read_text(),
    )
    return (sum(int(f[0]) for f in found), sum(int(f[1]) for f in found), sum(int(f[2]) for f in found))


@dataclass
class _FilesGone:
    """Upload sessions of acme in its repository ``a`` whose file is gone, as kills
    leave them (``_sessions_whose_file_a_kill_took``)."""

    tenant: Tenant
    #: 4000 bytes held: killed after its final PUT renamed its file into the content
    #: store (``blob``, now a blob file no link names), before its row went
    published: str
    blob: bytes
    #: 3000 bytes held: killed in a cancel after the file was deleted, before the row was
    cancelled: str
    #: sessions that hold nothing, without a file: one made two hours ago, one just now
    old: str
    fresh: str

    @property
    def sessions(self) -> set[str]:
        return {self.published, self.cancelled, self.old, self.fresh}


def _sessions_whose_file_a_kill_took(srv: EmberServer) -> _FilesGone:
    """Made by hand, with acme's quota set to 10000 bytes (7000 of it taken by them)."""
    ember(srv.home, "admin", "org", "quota", "acme", "10000")
    t = Tenant(srv, "acme", srv.create_token("acme"))
    storage = BlobStorage(srv.home / "registry")
    uploads = _uploads_dir(srv)
    published, cancelled = os.urandom(4000), os.urandom(3000)
    with t.client() as c:
        pub, loc = _start(c, "a")
        assert c.patch(loc, content=published).status_code == 202
        os.rename(uploads / pub, storage.blob_path(Digest.parse(sha256(published))))
        gone, loc = _start(c, "a")
        assert c.patch(loc, content=cancelled).status_code == 202
        os.unlink(uploads / gone)
        old, _ = _start(c, "a")
        fresh, _ = _start(c, "a")
    os.unlink(uploads / old)
    os.unlink(uploads / fresh)
    with _db(srv) as db:
        db.execute("UPDATE reg_uploads SET created_at = ? WHERE id = ?", (time.time() - 7200, old))
    assert (_held_bytes(srv, pub), _held_bytes(srv, gone)) == (4000, 3000)
    assert _org_use(srv, "acme") == (7000, 7000)
    return _FilesGone(t, pub, published, gone, old, fresh)


def _room_is_back(left: _FilesGone) -> None:
    """After the rows of ``left``'s sessions but ``fresh`` went: the retried blob and
    another one fit acme's quota."""
    assert _sessions(left.tenant.server) == {left.fresh}
    assert _org_use(left.tenant.server, "acme") == (0, 0)
    with left.tenant.client() as c:
        push_blob(c, "a", left.blob)
        push_blob(c, "a", os.urandom(5000))
    assert _org_use(left.tenant.server, "acme") == (9000, 0)


def test_a_purge_drops_sessions_whose_file_a_kill_took(start: Callable[..., EmberServer]) -> None:
    """A kill between a session's file going (published into the content store, or
    deleted by a cancel) and its row's delete left the row, holding its bytes under the
    quota for the 24 h until it expired: an organization near its quota was refused
    (the retry of the very blob too) with nothing stored.  The purge deletes such rows,
    never one a publication is about to delete (it holds the GC lock shared) nor a fresh
    one that holds nothing (a session's row is written just before its file)."""
    srv = start("--upload-purge-interval", QUICK)
    storage = BlobStorage(srv.home / "registry")
    with FileLock(storage.gc_lock, shared=True):  # as a publication does
        with _held(storage.purge_lock):  # no purge while the leftovers are made
            left = _sessions_whose_file_a_kill_took(srv)
        # while a publication holds the GC lock shared, no row without a file goes: it
        # may be that publication's, whose commit deletes it with the blob's link
        _purges_run(srv, 2)
        assert left.sessions <= _sessions(srv)
    _purges_run(srv)
    _room_is_back(left)
    _wait_for(lambda: _recovered(srv)[0] >= 3)
    _purges_run(srv)
    assert _recovered(srv) == (3, 0, 0), srv.log_tail()
    assert _sessions(srv) == {left.fresh}  # within the grace period: its file may be on the way


def _patch_killed_with_its_reservation(t: Tenant) -> tuple[str, str, int]:
    """A new upload session of ``t`` in ``a`` whose server was SIGKILLed in the middle of
    a PATCH of an 8 MiB chunk, 2 MiB of it sent: it reserved all 8 MiB (the quota must
    allow them), more than its file holds.  (The session, its URL, its file's size);
    the server is left stopped."""
    srv = t.server
    uploads = _uploads_dir(srv)
    with t.client() as c:
        session, loc = _start(c, "a")
    chunk = os.urandom(8 << 20)
    sock = send_partial(srv.host, "PATCH", loc, {
        "Authorization": f"Bearer {t.token}", "Content-Range": f"0-{len(chunk) - 1}",
        "Content-Length": str(len(chunk)), "Content-Type": "application/octet-stream",
    }, chunk[: 2 << 20])  # fmt: skip
    _wait_for(lambda: (uploads / session).stat().st_size >= 1 << 20)
    srv.kill()
    sock.close()
    size = (uploads / session).stat().st_size
    assert _held_bytes(srv, session) == len(chunk) > size
    return session, loc, size


def _reservation_is_cut(t: Tenant, session: str, loc: str, size: int) -> None:
    """``_patch_killed_with_its_reservation``'s session holds what its file does, under a
    12 MiB quota, and goes on (its server running)."""
    assert _held_bytes(t.server, session) == size
    assert _org_use(t.server, "acme") == (size, size)
    with t.client() as c:
        push_blob(c, "a", os.urandom(6 << 20))  # 14 MiB with the 8 reserved: refused
        r = c.get(loc)  # the session itself goes on from what arrived
        assert r.status_code == 204 and r.headers["Range"] == f"0-{size - 1}"


def test_a_purge_gives_back_what_a_killed_patch_reserved(start: Callable[..., EmberServer]) -> None:
    """A PATCH reserves room under the quota before it writes (all of a known length at
    once) and settles to what it wrote when it ends; killed in between, the session
    held the whole reservation until it expired, 24 h.  The purge cuts it down to the
    session's file (the session goes on), never while a request holds the session."""
    srv = start("--upload-purge-interval", QUICK)
    ember(srv.home, "admin", "org", "quota", "acme", "12M")
    t = Tenant(srv, "acme", srv.create_token("acme"))
    uploads = _uploads_dir(srv)
    with t.client() as c:
        live, live_loc = _start(c, "a")
    # a streamed PATCH reserves ahead of what it has written; while it holds the
    # session, purges leave its reservation alone
    with _appending(t, live_loc) as status:
        _purges_run(srv, 2)
        held = _held_bytes(srv, live)
        assert held is not None and held > (uploads / live).stat().st_size >= 1 << 20
    assert status() == 202
    assert _held_bytes(srv, live) == (uploads / live).stat().st_size  # settled by itself
    with t.client() as c:
        assert c.delete(live_loc).status_code == 204
    session, loc, size = _patch_killed_with_its_reservation(t)
    srv.restart_on_same_port()
    _purges_run(srv)
    _reservation_is_cut(t, session, loc, size)
    _wait_for(lambda: _recovered(srv)[1] >= 1)
    assert _recovered(srv) == (0, 1, 0), srv.log_tail()


def _partial_manifest_writes(storage: BlobStorage) -> tuple[Path, Path, Path]:
    """Partial writes in the registry's content store, as manifest PUTs killed inside
    ContentStore.put_bytes leave them: (two hours old, just made, two hours old: for a
    test to hold as a writer would)."""
    ingest = storage.content.ingest_dir
    killed, fresh, writing = (ingest / f"sha256-{c * 64}" for c in "abc")
    for path in (killed, fresh, writing):
        path.write_bytes(b'{"schemaVersion": 2, "mediaTy')
    for path in (killed, writing):
        os.utime(path, (time.time() - 7200,) * 2)
    return killed, fresh, writing


def test_a_purge_deletes_partial_manifest_writes(start: Callable[..., EmberServer]) -> None:
    """A manifest PUT killed inside ContentStore.put_bytes left its ingest file in the
    registry's content store for ever (the host store's gc prunes its own): the purge
    deletes those older than the grace period that no writer holds."""
    srv = start("--upload-purge-interval", QUICK)
    storage = BlobStorage(srv.home / "registry")
    ingest = storage.content.ingest_dir
    with _held(storage.purge_lock):
        killed, fresh, writing = _partial_manifest_writes(storage)
    with open(writing, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a writer holds its ingest file
        _purges_run(srv)
        assert sorted(p.name for p in ingest.iterdir()) == sorted(p.name for p in (fresh, writing))
    _wait_for(lambda: not writing.exists())  # its writer is gone now
    _wait_for(lambda: _recovered(srv)[2] >= 2)
    _purges_run(srv)
    assert _recovered(srv) == (0, 0, 2), srv.log_tail()
    assert fresh.exists()  # within the grace period
    t = Tenant(srv, "acme", srv.create_token("acme"))
    with t.client() as c:  # manifests are written as before
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
        r = c.put("/v2/a/manifests/v1", content=index, headers={"Content-Type": OCI_INDEX})
        assert r.status_code == 201, r.text


#: ``ember admin registry gc --json`` when it found nothing to do
_GC_NOTHING = {
    "manifests": 0, "links": 0, "blobs": 0, "bytes": 0, "uploads": 0, "repositories": 0,
    "dead_uploads": 0, "settled_uploads": 0, "ingests": 0,
}  # fmt: skip


def _gc(srv: EmberServer, *options: str) -> dict[str, int]:
    """``ember admin registry gc --json`` on ``srv``'s state directory (running or not)."""
    report: dict[str, int] = json.loads(
        ember(srv.home, "admin", "registry", "gc", *options, "--json").stdout
    )
    return report


def test_admin_gc_drops_sessions_whose_file_a_kill_took(start: Callable[..., EmberServer]) -> None:
    """Only the server's purge deleted the rows a kill left of sessions whose file was
    gone: with it off (--upload-purge-interval 0), they held their bytes under the quota
    until they expired, 24 h, whatever `ember admin registry gc` was run.  The gc
    deletes them as the purge does (the same code, under its exclusive GC lock); a dry
    run counts them and deletes nothing."""
    srv = start("--upload-purge-interval", "0")
    left = _sessions_whose_file_a_kill_took(srv)
    expected = {**_GC_NOTHING, "dead_uploads": 3}  # not the fresh one: within the grace
    assert _gc(srv, "--dry-run") == expected
    assert _sessions(srv) == left.sessions
    assert _org_use(srv, "acme") == (7000, 7000)
    assert _gc(srv) == expected
    _room_is_back(left)
    assert _gc(srv) == _GC_NOTHING


def test_admin_gc_gives_back_what_a_killed_patch_reserved(
    start: Callable[..., EmberServer],
) -> None:
    """A reservation a killed PATCH left above its session's file was cut only by the
    server's purge: with it off, `ember admin registry gc` left it counting against the
    quota until the session expired.  The gc cuts it (the server stopped, here); a dry
    run counts it and cuts nothing."""
    srv = start("--upload-purge-interval", "0")
    ember(srv.home, "admin", "org", "quota", "acme", "12M")
    t = Tenant(srv, "acme", srv.create_token("acme"))
    session, loc, size = _patch_killed_with_its_reservation(t)
    expected = {**_GC_NOTHING, "settled_uploads": 1}
    assert _gc(srv, "--dry-run") == expected
    assert _held_bytes(srv, session) == 8 << 20
    assert _gc(srv) == expected
    srv.restart_on_same_port()
    _reservation_is_cut(t, session, loc, size)
    assert _gc(srv) == _GC_NOTHING


def test_admin_gc_deletes_partial_manifest_writes(tmp_path: Path) -> None:
    """The partial writes killed manifest PUTs left in the registry's content store were
    deleted only by the server's purge: with it off, they stayed for ever, whatever
    `ember admin registry gc` was run.  The gc deletes those older than its grace
    period that no writer holds, and says so; a dry run counts them."""
    home = tmp_path / "home"
    ember(home, "admin", "org", "create", "acme")
    storage = BlobStorage(home / "registry")
    killed, fresh, writing = _partial_manifest_writes(storage)
    srv = EmberServer(home)  # never started: the state directory gc works on

    def left() -> set[Path]:
        return set(storage.content.ingest_dir.iterdir())

    with open(writing, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a writer holds its ingest file
        assert _gc(srv, "--dry-run") == {**_GC_NOTHING, "ingests": 1}
        assert left() == {killed, fresh, writing}
        out = ember(home, "admin", "registry", "gc", "--dry-run").stdout
        assert out == (
            "would free 0 manifests, 0 blob links, 0 blobs (0 bytes), 0 upload sessions, "
            "0 empty repositories; would recover from interrupted requests: 0 upload sessions "
            "whose file was gone, 0 upload reservations cut to what their file holds, "
            "1 partial manifest writes\n"
        )
        assert left() == {killed, fresh, writing}
        assert _gc(srv) == {**_GC_NOTHING, "ingests": 1}
        assert left() == {fresh, writing}
    out = ember(home, "admin", "registry", "gc").stdout  # its writer is gone now
    assert out.endswith("; recovered from interrupted requests: 0 upload sessions whose file "
                        "was gone, 0 upload reservations cut to what their file holds, "
                        "1 partial manifest writes\n")  # fmt: skip
    assert out.startswith("freed 0 manifests, ")
    assert left() == {fresh}  # within the grace period
    assert _gc(srv, "--grace", "0") == {**_GC_NOTHING, "ingests": 1}
    assert left() == set()


def test_open_uploads_per_organization_are_capped(start: Callable[..., EmberServer]) -> None:
    """Each POST made a session (a file and a row) and maybe a repository, without
    bound: empty sessions cost nothing against a quota."""
    srv = start("--max-uploads", "3")
    srv.create_org("beta")
    t = Tenant(srv, "acme", srv.create_token("acme", "pull,push,delete"))
    other = Tenant(srv, "beta", srv.create_token("beta"))
    with t.client() as c:
        layer = push_blob(c, "src", b"layer")  # its session ended: it does not count
        opened = [_start(c, repo) for repo in ("a", "b", "c")]
        r = c.post("/v2/d/blobs/uploads/")
        assert r.status_code == 429, r.text
        assert r.json()["errors"] == [{
            "code": "TOOMANYREQUESTS",
            "message": "organization acme has opened 3 uploads in the last hour that are not "
            "finished, the most it may have: finish or cancel some, or try again in 60 min (an "
            "upload counts for an hour after it started)",
        }]  # fmt: skip
        # the message says when the first of the three leaves the hour's count; the
        # header asks for a retry sooner (other sessions may end any moment)
        assert r.headers["Retry-After"] == str(RETRY_AFTER_MAX)
        assert "acme/d" not in _repos(srv)  # a refused POST writes nothing
        files = set(os.listdir(_uploads_dir(srv)))
        r = c.post("/v2/a/blobs/uploads/", params={"digest": sha256(b"m")}, content=b"m")
        assert r.status_code == 429  # a monolithic upload is a session too
        assert set(os.listdir(_uploads_dir(srv))) == files
        # a mount needs no session; another organization has its own count
        r = c.post("/v2/d/blobs/uploads/", params={"mount": layer, "from": "src"})
        assert r.status_code == 201, r.text
        with other.client() as o:
            _start(o, "a")
        # a session that ends (cancelled, finished, expired) makes room for one
        assert c.delete(opened[0][1]).status_code == 204
        _, loc = _start(c, "d")
        assert c.post("/v2/e/blobs/uploads/").status_code == 429
        assert c.put(at(loc, digest=sha256(b"blob")), content=b"blob").status_code == 201
        _, loc = _start(c, "d")
        assert c.post("/v2/e/blobs/uploads/").status_code == 429
        _expire(srv, opened[1][0])
        _start(c, "e")
        assert c.post("/v2/e/blobs/uploads/").status_code == 429
        # abandoned sessions (only their client can cancel them, with their URL) locked
        # the organization out until they expired, 24 h: one counts for an hour
        _opened_an_hour_ago(srv, opened[2][0])
        _start(c, "f")
        r = c.post("/v2/f/blobs/uploads/")
        assert r.status_code == 429
        # the answer says when the oldest one counted leaves the count
        _opened_an_hour_ago(srv, *_sessions(srv))
        first = _start(c, "g")[0]
        _start(c, "g"), _start(c, "g")
        _opened_ago(srv, 3570, first)
        r = c.post("/v2/g/blobs/uploads/")
        assert r.status_code == 429
        assert re.search(r"try again in (2[5-9]|3[01]) s", r.text), r.text  # whole-second expiries
        assert r.headers["Retry-After"] == str(RETRY_AFTER_MAX)


def test_sessions_opened_at_once_cannot_pass_the_cap(start: Callable[..., EmberServer]) -> None:
    srv = start("--max-uploads", "3")
    t = Tenant(srv, "acme", srv.create_token("acme"))

    def post(i: int) -> int:
        with t.client() as c:
            return c.post(f"/v2/r{i % 4}/blobs/uploads/").status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = sorted(pool.map(post, range(24)))
    assert statuses == [202] * 3 + [429] * 21
    assert len(_sessions(srv)) == 3


def test_skopeo_waits_for_a_session_to_end(start: Callable[..., EmberServer], busybox_layout: Path) -> None:
    """429 TOOMANYREQUESTS, not 403: skopeo and podman wait and try again (docker shows
    the message at once), so a push that comes while the organization's sessions are
    all taken goes through once one ends."""
    srv = start("--max-uploads", "1")
    t = Tenant(srv, "acme", srv.create_token("acme"))
    with t.client() as c:
        _, held = _start(c, "held")
        push = subprocess.Popen(
            ["skopeo", "--debug", "copy", "--dest-tls-verify=false", "--dest-creds", t.creds,
             layout_ref(busybox_layout), f"docker://{srv.host}/web:1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert push.stderr is not None
        said: list[str] = []
        # its first POST is refused: the session ends once skopeo has seen the 429
        while not said or "Too many requests to" not in said[-1]:
            said.append(read_line(push.stderr, timeout=60))
        assert c.delete(held).status_code == 204
        # skopeo honours Retry-After (RETRY_AFTER_MAX): a second refusal would be seen
        try:
            _, rest = push.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            push.kill()
            _, rest = push.communicate()
            pytest.fail(f"skopeo still waiting after the session ended: {rest[-3000:]}")
    stderr = "".join(said) + rest
    assert push.returncode == 0, stderr[-3000:]
    assert stderr.count("Too many requests to") == 1, stderr[-3000:]
    with t.client() as c:
        assert c.get("/v2/web/tags/list").json()["tags"] == ["1"]


def test_skopeo_shows_why_a_repository_is_refused(
    start: Callable[..., EmberServer], busybox_layout: Path
) -> None:
    srv = start("--max-repositories", "1")
    t = Tenant(srv, "acme", srv.create_token("acme"))
    with t.client() as c:
        push_blob(c, "first", b"x")
    res = subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", t.creds,
         layout_ref(busybox_layout), f"docker://{srv.host}/second:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode != 0
    assert "denied: organization acme has 1 repositories, the most it may have" in res.stderr, res.stderr


def test_repositories_per_organization_are_capped(start: Callable[..., EmberServer]) -> None:
    """A POST into a new name made a repository, which stayed after its upload was
    cancelled: any number of them."""
    srv = start("--max-repositories", "2", "--upload-purge-interval", QUICK)
    t = Tenant(srv, "acme", srv.create_token("acme", "pull,push,delete"))
    with t.client() as c:
        blob = push_blob(c, "a", b"a")
        push_blob(c, "b", b"b")
        r = c.post("/v2/c/blobs/uploads/")
        assert r.status_code == 403, r.text
        assert r.json()["errors"] == [{
            "code": "DENIED",
            "message": "organization acme has 2 repositories, the most it may have: push into "
            "one of them, or delete the manifests and blobs of one it no longer needs (a "
            "repository left with nothing is removed an hour after it was made)",
        }]  # fmt: skip
        assert c.post("/v2/c/blobs/uploads/", params={"mount": blob, "from": "a"}).status_code == 403
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
        r = c.put("/v2/c/manifests/v1", content=index, headers={"Content-Type": OCI_INDEX})
        assert r.status_code == 403 and "2 repositories" in r.text, r.text
        assert _repos(srv) == {"acme/a", "acme/b"} and len(_sessions(srv)) == 0
        _start(c, "a")  # the repositories it has take uploads as before
        # emptied (and older than the grace period), a repository is purged: room again
        assert c.delete(f"/v2/b/blobs/{sha256(b'b')}").status_code == 202
        with _db(srv) as db:
            db.execute("UPDATE reg_repos SET created_at = 0 WHERE name = 'acme/b'")
        _wait_for(lambda: "acme/b" not in _repos(srv))
        _start(c, "c")
        assert c.put("/v2/d/manifests/v1", content=index, headers={"Content-Type": OCI_INDEX}).status_code == 403
    assert _purged(srv)[2] == 1


def test_limits_reach_every_worker(start: Callable[..., EmberServer]) -> None:
    """With --workers N the limits are passed to the worker processes."""
    srv = start("--max-uploads", "2", workers=2)
    t = Tenant(srv, "acme", srv.create_token("acme"))
    statuses = []
    for _ in range(12):  # new connections: spread over both workers
        with t.client() as c:
            statuses.append(c.post("/v2/w/blobs/uploads/").status_code)
    assert statuses == [202, 202] + [429] * 10
    assert "at most 2 unfinished upload sessions opened in an hour" in srv.log_path.read_text()


def test_limits_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = subprocess.run(
        [EMBER, "--home", str(tmp_path / "home"), "server"],
        env={**os.environ, "EMBER_REGISTRY_MAX_UPLOADS": "-1"}, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "EMBER_REGISTRY_MAX_UPLOADS" in bad.stderr, bad.stderr
    monkeypatch.setenv("EMBER_REGISTRY_MAX_UPLOADS", "5")
    monkeypatch.setenv("EMBER_REGISTRY_MAX_REPOSITORIES", "0")
    monkeypatch.setenv("EMBER_REGISTRY_UPLOAD_PURGE_INTERVAL", "90")
    assert limits_from_env() == ServerLimits(5, 0, 90.0)  # what a worker process reads
    monkeypatch.setenv("EMBER_REGISTRY_UPLOAD_PURGE_INTERVAL", "soon")
    with pytest.raises(RegistryError, match="EMBER_REGISTRY_UPLOAD_PURGE_INTERVAL='soon' is not valid"):
        limits_from_env()


def test_an_upload_url_expires_with_its_session() -> None:
    """Valid until the second its session's row stops counting and may be purged (it
    was valid one second more)."""
    key = b"k" * 32
    state = UploadState("acme", "acme/a", "ab" * 16, 0, 1000)
    text = sign_state(key, state)
    assert verify_state(key, text, 999) == state
    with pytest.raises(InvalidUploadState, match="expired"):
        verify_state(key, text, 1000)


def test_a_database_from_before_upload_orgs_gets_the_column(tmp_path: Path) -> None:
    """0004 fills in each session's organization and indexes it; 0003, before it, makes
    only its own indexes (it made every index of the table, the new one too, which
    needs 0004's column)."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    meta = RegistryMetadata(url)
    meta.create_org("old")
    meta.create_upload("old", "old/a", "s1", time.time() + 3600)
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as db, db:  # as 0002 left it
        for index in ("reg_uploads_org", "reg_uploads_repo", "reg_repos_org"):
            db.execute(f"DROP INDEX {index}")
        for column in ("org_id", "held_bytes"):
            db.execute(f"ALTER TABLE reg_uploads DROP COLUMN {column}")
        db.execute("DELETE FROM ember_migrations WHERE id IN ('0003-quota-uploads', '0004-upload-orgs')")
    # a new process (this one has migrated its cached database already)
    ember(tmp_path, "admin", "org", "ls", "--db", url)
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as db:
        org_id = db.execute("SELECT id FROM reg_orgs WHERE name = 'old'").fetchone()[0]
        assert db.execute("SELECT id, org_id FROM reg_uploads").fetchall() == [("s1", org_id)]
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"reg_uploads_org", "reg_uploads_repo", "reg_repos_org"} <= indexes
        # the count every POST makes: one range of that index
        stmt = _OPEN_UPLOADS.compile(dialect=sqlite_dialect.dialect())
        given = {"org_id": org_id, "now": time.time(), "limit": 1000}
        args = [given.get(name, 0) for name in stmt.positiontup or ()]  # and OFFSET 0
        plan = db.execute(f"EXPLAIN QUERY PLAN {stmt}", args).fetchall()
        assert "USING COVERING INDEX reg_uploads_org (org_id=? AND expires_at>?)" in str(plan), plan


def test_the_server_commands_options_agree_with_the_limits() -> None:
    """`ember server` writes the defaults and variables out (so that `ember --help` does
    not import the server): they must be ServerLimits' and LIMIT_ENV's."""
    from ember.cli.server import server
    from ember.registry.server.config import LIMIT_ENV, ServerLimits

    options = {p.name: p for p in server.params if isinstance(p, click.Option)}
    defaults = ServerLimits()
    for name, variable in LIMIT_ENV.items():
        assert options[name].default == getattr(defaults, name)
        assert options[name].envvar == variable
