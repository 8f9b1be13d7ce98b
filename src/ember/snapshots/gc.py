"""Mark-and-sweep garbage collection of snapshots, content and leases.

Roots: every image in the image table (its manifest, config, layers, the
index it came from, and its chain of snapshots) and every live lease.  Marked
snapshots keep their parents.  Everything else goes: expired leases, active
snapshots nobody leases (stale), committed snapshots no root reaches, blobs
no image or lease names and stale partial downloads.

Runs under the image service's lock (no pull in progress) and the exclusive GC lock; lease changes take it shared, so a lease
made by a concurrent prepare is either seen or not yet made (and then the
prepare has not started building).  A snapshot whose lock is held (being
built or mounted) is skipped, never removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from ember.home import Home
from ember.oci.digest import Digest
from ember.snapshots import names
from ember.snapshots.errors import SnapshotInUse, SnapshotNotFound
from ember.snapshots.locks import FileLock
from ember.snapshots.model import Kind
from ember.snapshots.snapshotter import Snapshotter
from ember.store.content import ContentStore

log = logging.getLogger("ember.snapshots")

#: unreferenced blobs younger than this are kept (0: the image-service lock already keeps
#: gc away from pulls in progress)
DEFAULT_CONTENT_GRACE = 0.0
#: partial downloads untouched for this long are dropped (younger ones may be resumed)
INGEST_GRACE = 3600.0


@dataclass
class GCReport:
    snapshots: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    ingests: int = 0
    skipped: list[str] = field(default_factory=list)  # unreferenced but in use
    snapshot_bytes: int = 0  # free space the pool gained
    content_bytes: int = 0
    #: machine templates (ember.vm.template) unused for long or built from old inputs
    templates: list[str] = field(default_factory=list)
    template_bytes: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "snapshots": self.snapshots,
            "content": self.content,
            "leases": self.leases,
            "ingests": self.ingests,
            "skipped": self.skipped,
            "snapshot_bytes": self.snapshot_bytes,
            "content_bytes": self.content_bytes,
            "templates": self.templates,
            "template_bytes": self.template_bytes,
        }


@dataclass
class Roots:
    snapshots: set[str] = field(default_factory=set)
    content: set[str] = field(default_factory=set)


def image_roots(home: Home) -> Roots:
    """What the images in the image table need."""
    from ember.images import ImageService  # only GC needs the image service

    roots = Roots()
    service = ImageService(home)
    for record in service.list():
        roots.content.add(str(record.manifest_digest))
        roots.content.add(str(record.config_digest))
        if record.index_digest is not None:
            roots.content.add(str(record.index_digest))
        try:
            image = service.get(record.reference)
        except Exception as e:  # a damaged record must not make GC delete its layers blindly
            raise SnapshotInUse(
                f"cannot read image {record.reference} ({e}); gc stopped, nothing removed"
            ) from e
        roots.content.update(str(layer.digest) for layer in image.layers)
        if image.layers:
            roots.snapshots.add(str(image.layers[-1].chain_id))
    return roots


def collect(
    home: Home,
    *,
    dry_run: bool = False,
    content_grace: float = DEFAULT_CONTENT_GRACE,
    snapshotter: Snapshotter | None = None,
    roots: Roots | None = None,
    templates_unused_for: float | None = None,
) -> GCReport:
    """Mark from images and live leases, sweep snapshots, blobs and expired leases; also
    drop machine templates no machine started from for ``templates_unused_for`` seconds
    (default ``ember.vm.template.UNUSED_FOR``: a week) or built from inputs since replaced."""
    from ember.vm import template  # a cache of its own, outside the mark-and-sweep

    # No pool yet: no snapshots and no leases, only content to sweep (a pool is not set
    # up just to find that out).
    snap = snapshotter or Snapshotter.existing(home)
    report = GCReport(dry_run=dry_run)
    # The image service holds images.lock shared while it pulls and exclusive while it
    # removes: holding it exclusive from reading the roots to the end of the sweep means
    # no pull is writing blobs it has not recorded yet.  Order: images.lock, then gc.lock.
    home.run.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        held.enter_context(FileLock(home.run / "images.lock"))
        if snap is not None:
            held.enter_context(FileLock(snap.gc_lock))
        now = time.time()
        if roots is None:
            roots = image_roots(home)
        if snap is not None:
            _mark_leases(snap, roots, report, dry_run, now)
            _sweep_snapshots(snap, roots, report, dry_run)
        _sweep_content(home, roots, report, dry_run, content_grace, now)
    age = template.UNUSED_FOR if templates_unused_for is None else templates_unused_for
    for key, size in template.prune_unused(home, age, dry_run=dry_run):
        report.templates.append(key)
        report.template_bytes += size
    return report


def _mark_leases(snap: Snapshotter, roots: Roots, report: GCReport, dry_run: bool, now: float) -> None:
    """Add what live leases hold to ``roots``; drop expired leases."""
    for lease in snap.leases.list():
        if lease.expired(now):
            report.leases.append(lease.name)
            if not dry_run:
                # direct unlink: Leases.delete would wait for the lock we hold
                (snap.pool.leases / f"{names.encode(lease.name, 'lease name')}.json").unlink(
                    missing_ok=True
                )
        else:
            roots.snapshots.update(lease.snapshots)
            roots.content.update(lease.content)


def _sweep_snapshots(snap: Snapshotter, roots: Roots, report: GCReport, dry_run: bool) -> None:
    infos = {s.name: s for s in snap.list()}
    marked: set[str] = set()

    def mark(name: str | None) -> None:
        while name is not None and name not in marked and name in infos:
            marked.add(name)
            name = infos[name].parent

    for name in roots.snapshots:
        mark(name)

    # children before parents: actives first, then committed by depth, deepest first
    def depth(name: str) -> int:
        d, seen = 0, set()
        while (p := infos[name].parent) is not None and p in infos and p not in seen:
            seen.add(p)
            name, d = p, d + 1
        return d

    victims = [n for n in infos if n not in marked]
    victims.sort(key=lambda n: (infos[n].kind is Kind.COMMITTED, -depth(n)))
    before = _free(snap)
    for name in victims:
        if dry_run:
            report.snapshots.append(name)
            continue
        try:
            snap.remove(name)
            report.snapshots.append(name)
        except SnapshotNotFound:
            continue
        except SnapshotInUse as e:
            report.skipped.append(name)
            log.info("gc: keeping %s: %s", name, e)
    if not dry_run:
        report.snapshot_bytes = max(_free(snap) - before, 0)


def _free(snap: Snapshotter) -> int:
    os.sync()  # XFS returns blocks of unlinked files in the background; count them now
    return shutil.disk_usage(snap.pool.root).free


def _sweep_content(
    home: Home, roots: Roots, report: GCReport, dry_run: bool, grace: float, now: float
) -> None:
    _sweep_blobs(ContentStore(home.content), roots, report, dry_run, grace, now)


def _sweep_blobs(
    store: ContentStore, roots: Roots, report: GCReport, dry_run: bool, grace: float, now: float
) -> None:
    keep: set[Digest] = set()
    for text in roots.content:
        try:
            keep.add(Digest.parse(text))
        except Exception:
            continue
    for digest in list(store.list()):
        if digest in keep:
            continue
        path = store.path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if now - st.st_mtime < grace:
            report.skipped.append(str(digest))
            continue
        report.content.append(str(digest))
        report.content_bytes += st.st_size
        if not dry_run:
            store.delete(digest)
    if not dry_run:
        report.ingests = store.prune_ingests(older_than=max(grace, INGEST_GRACE))
