"""Registry garbage collection: mark from tags, sweep what nothing reaches.

Per repository, a manifest is *reachable* if a tag names it, if a reachable
index lists it, or if its ``subject`` is reachable (referrers live as long as
what they refer to).  Unreachable manifests, blob links no remaining manifest
uses, expired upload sessions and blob files no link or manifest names are
freed; everything younger than the grace period is left alone, so an image
being pushed right now (layers uploaded, manifest not yet put) survives.

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

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from ember.oci.digest import Digest
from ember.registry.server import schema as s
from ember.registry.server.metadata import RegistryMetadata
from ember.registry.server.storage import BlobStorage


@dataclass
class GcReport:
    manifests: int = 0
    links: int = 0
    blobs: int = 0
    bytes: int = 0
    uploads: int = 0
    repositories: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


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


def _sweep_metadata(conn: Connection, cutoff: float, keep_untagged: bool, report: GcReport) -> None:
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
        roots = tagged[repo_id] | ({d for d, _ in rows} if keep_untagged else set())
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


def _sweep_upload_rows(conn: Connection, storage: BlobStorage, cutoff: float, report: GcReport) -> set[str]:
    """Delete the rows of expired upload sessions; return the sessions whose files go."""
    now = time.time()
    rows = conn.execute(select(s.uploads.c.id, s.uploads.c.expires_at)).all()
    expired = {sid for sid, expires in rows if expires < now}
    live = {sid for sid, _ in rows} - expired
    for session in expired:
        conn.execute(delete(s.uploads).where(s.uploads.c.id == session))
    # files of expired sessions, and files whose row never got written (a crash) once past grace
    stale = set(expired)
    for entry in os.scandir(storage.uploads):
        if entry.name in live:
            continue
        try:
            if entry.stat().st_mtime < cutoff:
                stale.add(entry.name)
        except FileNotFoundError:
            continue
    report.uploads = len(stale)
    return stale


def _sweep_repositories(conn: Connection, cutoff: float, report: GcReport) -> None:
    """Repositories left with nothing (an upload started and cancelled, everything deleted)."""
    empty = (
        select(s.repos.c.id)
        .where(s.repos.c.created_at < cutoff)
        .where(~select(s.blob_links.c.repo_id).where(s.blob_links.c.repo_id == s.repos.c.id).exists())
        .where(~select(s.manifests.c.repo_id).where(s.manifests.c.repo_id == s.repos.c.id).exists())
        .where(~select(s.tags.c.repo_id).where(s.tags.c.repo_id == s.repos.c.id).exists())
        .where(~select(s.uploads.c.repo_id).where(s.uploads.c.repo_id == s.repos.c.id).exists())
    )
    # one statement: the emptiness check and the delete cannot be split by a push
    report.repositories = conn.execute(delete(s.repos).where(s.repos.c.id.in_(empty))).rowcount


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
    grace: float = 3600,
    dry_run: bool = False,
    keep_untagged: bool = False,
) -> GcReport:
    """Sweep once; ``keep_untagged`` keeps manifests pushed by digest and never tagged."""
    storage = BlobStorage(root)
    cutoff = time.time() - grace
    report = GcReport()
    if dry_run:
        # The same sweep in one transaction that is rolled back, so each phase
        # sees what the earlier ones would free (a blob whose last link goes, a
        # repository left empty); no file is touched and no lock taken.
        with meta.db.connect() as conn, conn.begin() as transaction:
            _sweep_metadata(conn, cutoff, keep_untagged, report)
            _sweep_upload_rows(conn, storage, cutoff, report)
            _sweep_repositories(conn, cutoff, report)
            _unnamed_blobs(conn, storage, cutoff, report)
            transaction.rollback()
        return report
    # Exclusive against every writer that checks and then links (upload PUT, mount,
    # manifest PUT): they wait while GC decides and deletes, so nothing it frees can
    # gain a reference half way.  Rows are committed before the files they named
    # go: a failed commit must not leave rows naming deleted files.
    with storage.collecting():
        with meta.db.begin() as conn:
            _sweep_metadata(conn, cutoff, keep_untagged, report)
        with meta.db.begin() as conn:
            stale_uploads = _sweep_upload_rows(conn, storage, cutoff, report)
        for session in stale_uploads:
            storage.drop_session_if_idle(session)  # one in use is not stale
        with meta.db.begin() as conn:
            _sweep_repositories(conn, cutoff, report)
        with meta.db.connect() as conn:
            unnamed = _unnamed_blobs(conn, storage, cutoff, report)
        for digest in unnamed:
            storage.content.delete(digest)
    return report
