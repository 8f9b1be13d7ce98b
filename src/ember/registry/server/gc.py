"""Registry garbage collection: mark from tags, sweep what nothing reaches.

Per repository, a manifest is *reachable* if a tag names it, if a reachable
index lists it, or if its ``subject`` is reachable (referrers live as long as
what they refer to).  Unreachable manifests, blob links no remaining manifest
uses, expired upload sessions and blob files no link or manifest names are
freed; everything younger than the grace period is left alone, so an image
being pushed right now (layers uploaded, manifest not yet put) survives.

The server runs part of it by itself (``purge``): expired upload sessions and
empty repositories, periodically.  Both repair what a kill -9 of a request left
behind (upload sessions whose file is gone, reservations a request did not settle,
the content store's partial writes of manifests), with the same code
(``_repair_interrupted``, ``_sweep_rows``).

The whole sweep holds the exclusive GC lock; writers hold the shared lock
from checking that what they reference exists (or making a blob fresh) until
their rows are committed (``BlobStorage.publishing``), so a sweep never frees
a link, manifest or blob that a write in flight is about to reference.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import ColumnElement, delete, or_, select
from sqlalchemy.engine import Connection

from ember.locks import try_lock
from ember.oci.digest import Digest
from ember.registry.server import schema as s
from ember.registry.server.metadata import RegistryMetadata
from ember.registry.server.storage import BlobStorage

#: how long new content is safe from a sweep (``ember admin registry gc --grace``'s
#: default, and the server's purge's)
DEFAULT_GRACE = 3600.0


@dataclass
class GcReport:
    manifests: int = 0
    links: int = 0
    blobs: int = 0
    bytes: int = 0
    uploads: int = 0
    repositories: int = 0
    #: what killed requests left (``PurgeReport``'s): unexpired upload sessions whose
    #: file was gone (rows deleted), reservations cut down to their session's file,
    #: partial writes of the content store (manifests) deleted
    dead_uploads: int = 0
    settled_uploads: int = 0
    ingests: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class UploadSweep:
    #: expired upload sessions and leftover upload files deleted
    sessions: int = 0
    #: the bytes their files held
    bytes: int = 0


def _reachable(
    tagged: set[str], children: dict[str, set[str]], referrers: dict[str, set[str]]
) -> set[str]:
    seen: set[str] = set()
    todo = list(tagged)
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        todo.extend(children.get(d, ()))
        todo.extend(referrers.get(d, ()))
    return seen


def _sweep_metadata(conn: Connection, cutoff: float, delete_untagged: bool, report: GcReport) -> None:
    manifests = conn.execute(
        select(s.manifests.c.repo_id, s.manifests.c.digest, s.manifests.c.subject, s.manifests.c.created_at)
    ).all()
    tags = conn.execute(select(s.tags.c.repo_id, s.tags.c.digest)).all()
    refs = conn.execute(
        select(s.manifest_refs.c.repo_id, s.manifest_refs.c.manifest, s.manifest_refs.c.child, s.manifest_refs.c.kind)
    ).all()
    tagged: dict[int, set[str]] = defaultdict(set)
    for repo_id, digest in tags:
        tagged[repo_id].add(digest)
    children: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for repo_id, parent, child, kind in refs:
        if kind == "manifest":
            children[repo_id][parent].add(child)
    referrers: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for repo_id, digest, subject, _ in manifests:
        if subject:
            referrers[repo_id][subject].add(digest)
    per_repo: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for repo_id, digest, _, created in manifests:
        per_repo[repo_id].append((digest, created))
    doomed: list[tuple[int, str]] = []
    for repo_id, rows in per_repo.items():
        roots = tagged[repo_id] | (set() if delete_untagged else {d for d, _ in rows})
        keep = _reachable(roots, children[repo_id], referrers[repo_id])
        doomed += [(repo_id, d) for d, created in rows if d not in keep and created < cutoff]
    report.manifests = len(doomed)
    doomed_set = set(doomed)
    # blob links: used if a surviving manifest references them
    used = {(rid, child) for rid, parent, child, kind in refs if kind == "blob" and (rid, parent) not in doomed_set}
    links = conn.execute(select(s.blob_links.c.repo_id, s.blob_links.c.digest, s.blob_links.c.created_at)).all()
    stale_links = [(rid, d) for rid, d, created in links if (rid, d) not in used and created < cutoff]
    report.links = len(stale_links)
    for rid, d in doomed:
        conn.execute(delete(s.manifests).where(s.manifests.c.repo_id == rid, s.manifests.c.digest == d))
        conn.execute(delete(s.manifest_refs).where(s.manifest_refs.c.repo_id == rid, s.manifest_refs.c.manifest == d))
    for rid, d in stale_links:
        conn.execute(delete(s.blob_links).where(s.blob_links.c.repo_id == rid, s.blob_links.c.digest == d))


def _stale_uploads(
    conn: Connection, storage: BlobStorage, now: float, cutoff: float
) -> tuple[list[str], list[str]]:
    """(upload sessions past their expiry, upload files no session names that were last
    written before ``cutoff``: a crash between a session's row and its file).

    The files are listed before the rows are read: a session's row commits before its
    file is made, so a file listed here whose row exists is never taken for a leftover.
    An expired session's URLs no longer verify (uploadstate: valid while now < expiry):
    no request can start on it."""
    files = []
    for entry in os.scandir(storage.uploads):
        try:
            files.append((entry.name, entry.stat().st_mtime))
        except FileNotFoundError:
            continue
    rows = conn.execute(select(s.uploads.c.id, s.uploads.c.expires_at)).all()
    expired = [sid for sid, expires in rows if expires <= now]
    known = {sid for sid, _ in rows}
    leftovers = [name for name, mtime in files if name not in known and mtime < cutoff]
    return expired, leftovers


def _delete_upload_rows(conn: Connection, sessions: list[str]) -> None:
    for i in range(0, len(sessions), 500):
        conn.execute(delete(s.uploads).where(s.uploads.c.id.in_(sessions[i : i + 500])))


def sweep_uploads(
    meta: RegistryMetadata, storage: BlobStorage, cutoff: float, now: float | None = None
) -> UploadSweep:
    """Delete the upload sessions past their expiry (as of ``now``), and upload files no
    session names that were last written before ``cutoff``.  Each file goes first, under
    its session's lock: one that a request (begun before the expiry) still appends to or
    publishes stays, file and row, for a later sweep; then the rows of the sessions whose
    files went, in one transaction (a row left without its file by a crash in between
    names an expired session, which no URL reaches; the next sweep deletes it).

    Used by ``ember admin registry gc`` and by the server's periodic purge."""
    now = time.time() if now is None else now
    with meta.db.connect() as conn:
        expired, leftovers = _stale_uploads(conn, storage, now, cutoff)
    sweep = UploadSweep()
    gone = []
    for session in [*expired, *leftovers]:
        size = storage.session_size(session) or 0
        if storage.drop_session_if_idle(session):
            gone.append(session)
            sweep.sessions += 1
            sweep.bytes += size
    rows = sorted(set(gone) & set(expired))
    if rows:
        with meta.db.begin() as conn:
            _delete_upload_rows(conn, rows)
    return sweep


def settle_uploads(meta: RegistryMetadata, storage: BlobStorage, now: float) -> int:
    """Cut the reservation of each unexpired upload session that holds more room under
    its organization's quota than its file has bytes down to the file's size; how many.

    A request reserves room before it writes and settles to what it wrote when it ends
    (``Allowance.settle``); one killed in between (mid-PATCH) left its reservation, which
    counted against the quota until the session expired.  Each cut is made under the
    session's lock, taken without waiting: a request holding it now is between its
    reservation and its settle (its own settle follows), and no request starts on the
    session until the cut is committed."""
    with meta.db.connect() as conn:
        sessions = _unsettled_uploads(conn, storage, now)
    cut = 0
    for session in sessions:
        with storage.idle_session(session) as idle_size:
            if idle_size is not None and meta.cut_upload(session, idle_size):
                cut += 1
    return cut


def _unsettled_uploads(conn: Connection, storage: BlobStorage, now: float) -> list[str]:
    """The unexpired upload sessions that hold more room under a quota than their file
    has bytes (``settle_uploads`` cuts them; a dry run of a gc counts them, a request
    in the middle of its body included: it takes no session's lock)."""
    rows = conn.execute(
        select(s.uploads.c.id, s.uploads.c.held_bytes).where(
            s.uploads.c.expires_at > now, s.uploads.c.held_bytes > 0
        )
    ).all()
    unsettled = []
    for session, held in rows:
        size = storage.session_size(session)
        if size is not None and size < held:  # else as settled (or gone: _dead_uploads)
            unsettled.append(session)
    return unsettled


#: the first letter of a monolithic upload's session id (the others are hex: a uuid4's)
MONOLITHIC_PREFIX = "m"


def _dead_upload(cutoff: float) -> ColumnElement[bool]:
    """A session whose row may go if its file is gone: one that holds room under a
    quota, or was made before ``cutoff``.  A session's row commits just before its file
    is made, and holds nothing until a request on it (which needs the file) reserves
    room: a fresh row without a file may be one whose file is being made."""
    return or_(s.uploads.c.created_at < cutoff, s.uploads.c.held_bytes > 0)


def _dead_uploads(conn: Connection, storage: BlobStorage, cutoff: float) -> list[str]:
    """Upload sessions (``_dead_upload``) whose file is gone: rows a kill left between
    the file going (published into the content store, deleted by a cancel or a refusal)
    and the row's delete.  No URL reaches them (a request needs the file), yet they
    counted against the quota and the cap on open sessions until they expired."""
    rows = conn.execute(select(s.uploads.c.id).where(_dead_upload(cutoff))).all()
    return [sid for (sid,) in rows if storage.session_size(sid) is None]


def _drop_dead_uploads(
    conn: Connection, storage: BlobStorage, sessions: list[str], cutoff: float
) -> int:
    """Delete the rows of ``sessions`` (``_dead_uploads``) whose file is still gone; how
    many.  Under the exclusive GC lock: an upload being published holds it shared from
    renaming its file into the content store until the commit that deletes its row (and
    links the blob), so a file gone now is not one being published."""
    gone = [sid for sid in sessions if storage.session_size(sid) is None]
    dropped = 0
    for i in range(0, len(gone), 500):
        dropped += conn.execute(
            delete(s.uploads).where(s.uploads.c.id.in_(gone[i : i + 500]), _dead_upload(cutoff))
        ).rowcount
    return int(dropped)


def repairs_said(report: GcReport | PurgeReport) -> str:
    """The repairs of what killed requests left, as the server's log and ``ember admin
    registry gc`` say them."""
    return (
        f"{report.dead_uploads} upload sessions whose file was gone, "
        f"{report.settled_uploads} upload reservations cut to what their file holds, "
        f"{report.ingests} partial manifest writes"
    )


def _repair_interrupted(
    meta: RegistryMetadata, storage: BlobStorage, now: float, grace: float
) -> tuple[int, int, list[str]]:
    """What killed requests left, the part that needs no GC lock: reservations above
    their session's file cut down (``settle_uploads``), partial writes of the content
    store (manifests) untouched for ``grace`` that no writer holds deleted
    (``ContentStore.prune_ingests``); and the sessions whose file is gone
    (``_dead_uploads``), whose rows ``_sweep_rows`` deletes under the exclusive GC lock.
    (reservations cut, partial writes deleted, those sessions).

    The purge's, and ``collect``'s, which calls it holding the exclusive GC lock: the
    locks taken here (a session's, a partial write's) are taken without waiting, and
    no request waits for the GC lock while it holds one of them (a publication takes
    its session's lock, a manifest PUT its partial write's, inside the GC lock)."""
    settled = settle_uploads(meta, storage, now)
    ingests = storage.content.prune_ingests(grace)
    with meta.db.connect() as conn:
        _drop_stranded_monolithic(conn, storage, now - grace)
        dead = _dead_uploads(conn, storage, now - grace)
    return settled, ingests, dead


def _drop_stranded_monolithic(conn: Connection, storage: BlobStorage, cutoff: float) -> None:
    """Delete the files of monolithic uploads (``POST ?digest=``) begun before ``cutoff``
    that no request holds: one whose request was killed mid-body.  Its client never got
    a URL for it, so nothing resumes or ends it, yet its bytes counted against the quota
    (and stayed on disk) until it expired a day later.  Its row then goes as a session
    whose file is gone (``_dead_uploads``)."""
    rows = conn.execute(
        select(s.uploads.c.id).where(
            s.uploads.c.id.startswith(MONOLITHIC_PREFIX), s.uploads.c.created_at < cutoff
        )
    ).all()
    for (sid,) in rows:
        try:
            written = os.stat(storage.session_path(sid)).st_mtime
        except FileNotFoundError:
            continue  # (published or dropped meanwhile: its row goes as a dead one)
        # Not one whose body arrived within the grace period: a long upload between its
        # last byte and its publication holds no lock for a moment (its reservation)
        if written < cutoff:
            storage.drop_session_if_idle(sid)


def _sweep_rows(
    conn: Connection, storage: BlobStorage, dead: list[str], cutoff: float
) -> tuple[int, int]:
    """Under the exclusive GC lock, in ``conn``'s transaction: the rows of the ``dead``
    upload sessions whose file is still gone (``_drop_dead_uploads``), then the
    repositories left with nothing (those sessions' too), older than ``cutoff``;
    (sessions, repositories) deleted.  The purge's and ``collect``'s."""
    return _drop_dead_uploads(conn, storage, dead, cutoff), _sweep_repositories(conn, cutoff)


def _sweep_repositories(conn: Connection, cutoff: float) -> int:
    """Delete the repositories left with nothing (an upload started and cancelled,
    everything deleted) that are older than ``cutoff``; how many."""
    empty = (
        select(s.repos.c.id)
        .where(s.repos.c.created_at < cutoff)
        .where(~select(s.blob_links.c.repo_id).where(s.blob_links.c.repo_id == s.repos.c.id).exists())
        .where(~select(s.manifests.c.repo_id).where(s.manifests.c.repo_id == s.repos.c.id).exists())
        .where(~select(s.tags.c.repo_id).where(s.tags.c.repo_id == s.repos.c.id).exists())
        .where(~select(s.uploads.c.repo_id).where(s.uploads.c.repo_id == s.repos.c.id).exists())
    )
    # one statement: the emptiness check and the delete cannot be split by a push
    return int(conn.execute(delete(s.repos).where(s.repos.c.id.in_(empty))).rowcount)


def _unnamed_blobs(conn: Connection, storage: BlobStorage, cutoff: float, report: GcReport) -> list[Digest]:
    """Blob files that no link or manifest names, once past the grace period."""
    known = {r[0] for r in conn.execute(select(s.blob_links.c.digest).distinct())}
    known |= {r[0] for r in conn.execute(select(s.manifests.c.digest).distinct())}
    doomed: list[Digest] = []
    for digest in list(storage.content.list()):
        if str(digest) in known:
            continue
        try:
            st = storage.blob_path(digest).stat()
        except FileNotFoundError:
            continue
        if st.st_mtime >= cutoff:
            continue  # fresh: its link or manifest may be on the way
        report.blobs += 1
        report.bytes += st.st_size
        doomed.append(digest)
    return doomed


def collect(
    meta: RegistryMetadata,
    root: Path,
    *,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    delete_untagged: bool = False,
) -> GcReport:
    """Sweep once; ``delete_untagged`` also deletes manifests no tag reaches (pushed by
    digest, or whose tag moved on), which are otherwise kept, as Distribution keeps them:
    deployments pull them by digest.

    Also repairs what killed requests left, as the server's purge does (the same code):
    reservations above their session's file, partial writes of manifests, unexpired
    upload sessions whose file is gone (``_repair_interrupted``, ``_sweep_rows``)."""
    storage = BlobStorage(root)
    now = time.time()
    cutoff = now - grace
    report = GcReport()
    if dry_run:
        # The same sweep in one transaction that is rolled back, so each phase
        # sees what the earlier ones would free (a blob whose last link goes, a
        # repository left empty; an expired session whose file is gone is the upload
        # sweep's, not counted again as dead).  No file is changed, and the only locks
        # are a moment's flock (without waiting) of each old partial write, to leave
        # out one a writer holds, as a sweep does.
        with meta.db.connect() as conn, conn.begin() as transaction:
            _sweep_metadata(conn, cutoff, delete_untagged, report)
            expired, leftovers = _stale_uploads(conn, storage, now, cutoff)
            _delete_upload_rows(conn, expired)
            report.uploads = len(expired) + len(leftovers)
            report.settled_uploads = len(_unsettled_uploads(conn, storage, now))
            report.ingests = storage.content.stale_ingests(grace)[0]
            dead = _dead_uploads(conn, storage, cutoff)
            report.dead_uploads, report.repositories = _sweep_rows(conn, storage, dead, cutoff)
            _unnamed_blobs(conn, storage, cutoff, report)
            transaction.rollback()
        return report
    # Exclusive against every writer that checks and then links (upload PUT, mount,
    # manifest PUT): they wait while GC decides and deletes, so nothing it frees can
    # gain a reference half way.  Rows are committed before the files they named
    # go: a failed commit must not leave rows naming deleted files.  The rows of
    # sessions whose file is gone are deleted under it as the purge's are (a file gone
    # now is not one being published), in the transaction of the repository sweep,
    # directly: the purge's way to the lock (gc_lock_if_free) would find it held, by
    # this very sweep.
    with storage.collecting():
        with meta.db.begin() as conn:
            _sweep_metadata(conn, cutoff, delete_untagged, report)
        report.uploads = sweep_uploads(meta, storage, cutoff, now).sessions
        settled, ingests, dead = _repair_interrupted(meta, storage, now, grace)
        report.settled_uploads, report.ingests = settled, ingests
        with meta.db.begin() as conn:
            report.dead_uploads, report.repositories = _sweep_rows(conn, storage, dead, cutoff)
        with meta.db.connect() as conn:
            unnamed = _unnamed_blobs(conn, storage, cutoff, report)
        for digest in unnamed:
            storage.content.delete(digest)
    return report


@dataclass
class PurgeReport:
    uploads: UploadSweep
    #: repositories left with nothing that were deleted
    repositories: int = 0
    #: what killed requests left: unexpired upload sessions whose file was gone (rows
    #: deleted), reservations cut down to their session's file, partial writes of the
    #: content store (manifests) deleted
    dead_uploads: int = 0
    settled_uploads: int = 0
    ingests: int = 0


#: how many times (50 ms apart) a purge tries for the exclusive GC lock, which pushes
#: hold shared for moments, before leaving repositories to the next purge
_REPO_LOCK_TRIES = 20


def purge(
    meta: RegistryMetadata,
    storage: BlobStorage,
    interval: float,
    grace: float = DEFAULT_GRACE,
    *,
    at_start: bool = False,
) -> PurgeReport | None:
    """The server's own periodic sweep (every ``interval`` seconds): upload sessions past
    their expiry (``sweep_uploads``: with upload files no session names, once older than
    ``grace``), then what killed requests left: reservations above their session's file
    (``settle_uploads``), partial writes of the content store (manifests) untouched for
    ``grace`` and that no writer holds (``ContentStore.prune_ingests``), and unexpired
    sessions whose file is gone (``_dead_uploads``); then repositories left with
    nothing, once older than ``grace``.

    None when it did not run: another process (a worker, a replica over this state
    directory) purges now or did less than half an interval ago (each runs the timer;
    one of them purges; not ``at_start``: a server killed and started again at once had
    purged at its own start, and what its killed requests held waited an hour for the
    next purge), or ``ember admin registry gc`` is sweeping (which does all of this too).
    Uploads are swept under the shared GC lock (alongside pushes, never during a gc);
    the rows of sessions whose file is gone and repositories under the exclusive one,
    as gc does (pushes hold it shared from making sure their repository exists, or from
    publishing a session's file, until their rows are in), if it can be had within
    about a second, else at the next purge."""
    lock = try_lock(storage.purge_lock)
    if lock is None:
        return None
    fd = lock.fd  # the lock file holds when the last purge ran
    try:
        now = time.time()
        last = _last_purge(fd)
        if not at_start and last is not None and 0 <= now - last < interval / 2:
            return None
        with storage.gc_lock_if_free(exclusive=False) as free:
            if not free:
                return None
            report = PurgeReport(sweep_uploads(meta, storage, now - grace, now))
        settled, ingests, dead = _repair_interrupted(meta, storage, now, grace)
        report.settled_uploads, report.ingests = settled, ingests
        report.dead_uploads, report.repositories = _purge_exclusive(
            meta, storage, dead, now - grace
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, repr(now).encode(), 0)
        return report
    finally:
        lock.release()


def _last_purge(fd: int) -> float | None:
    """When the last purge ran, as the purge lock file says (None: never, or unreadable)."""
    try:
        return float(os.pread(fd, 64, 0).decode())
    except (ValueError, UnicodeDecodeError):
        return None


def _purge_exclusive(
    meta: RegistryMetadata, storage: BlobStorage, dead: list[str], cutoff: float
) -> tuple[int, int]:
    """``_sweep_rows`` under the exclusive GC lock, if it can be had within about a
    second; (0, 0) when it was not."""
    for _ in range(_REPO_LOCK_TRIES):
        with storage.gc_lock_if_free(exclusive=True) as free:
            if free:
                with meta.db.begin() as conn:
                    return _sweep_rows(conn, storage, dead, cutoff)
        time.sleep(0.05)
    return 0, 0
