"""The registry's metadata in the database: orgs, tokens, repositories, links,
manifests, tags, referrers and upload sessions.

Blocking (SQLAlchemy Core); the HTTP layer calls it from worker threads.
Writes that race between clients (two pushers linking the same layer, two
tag updates) are idempotent inserts or upserts, so concurrency never turns
into an error.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    union,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ember.registry.server import schema as s
from ember.registry.server.errors import (
    OrgExists,
    OrgLimitReached,
    OrgNotFound,
    RegistryError,
    TokenNotFound,
)
from ember.registry.server.names import check_org_name, check_token_label
from ember.registry.server.references import NewManifest
from ember.registry.server.tokens import hash_api_token, new_api_token
from ember.store.db import Database, insert_ignore, masked_url, open_database, upsert
from ember.store.errors import DatabaseError


@dataclass(frozen=True)
class OrgInfo:
    name: str
    created_at: float
    repositories: int
    tokens: int
    #: bytes it holds (distinct blobs and manifests of its repositories, and its open
    #: upload sessions), and the limit (None: none)
    used_bytes: int = 0
    quota_bytes: int | None = None
    #: the part of ``used_bytes`` that open upload sessions hold
    upload_bytes: int = 0


@dataclass(frozen=True)
class Quota:
    limit: int
    #: distinct blobs and manifests stored, plus the bytes open upload sessions hold
    #: (without the session the question is about, if any)
    used: int
    #: the part of ``used`` that open upload sessions hold
    uploads: int = 0
    #: the blob or manifest asked about is stored in the organization already
    holds: bool = False

    def allows(self, size: int) -> bool:
        """Whether ``size`` more bytes fit (content the organization holds always does)."""
        return self.holds or self.used + size <= self.limit

    @property
    def room(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class TokenInfo:
    id: str
    org: str
    label: str
    actions: frozenset[str]
    created_at: float
    revoked_at: float | None
    expires_at: float | None = None


@dataclass(frozen=True)
class ResolvedToken:
    """A live API token: whom it acts for, with what, until when."""

    org: str
    token_id: str
    actions: frozenset[str]
    expires_at: float | None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True)
class ManifestRow:
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Referrer:
    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    annotations: dict[str, str] | None


# The hot read paths (every blob and manifest GET/HEAD), built once: building a
# statement per request cost more than running it (profiled with bench/registry.py).
_BLOB_SIZE = (
    select(s.blob_links.c.size)
    .join(s.repos, s.repos.c.id == s.blob_links.c.repo_id)
    .where(s.repos.c.name == bindparam("full"), s.blob_links.c.digest == bindparam("digest"))
)
_MANIFEST = (
    select(s.manifests.c.digest, s.manifests.c.media_type, s.manifests.c.size)
    .join(s.repos, s.repos.c.id == s.manifests.c.repo_id)
    .where(s.repos.c.name == bindparam("full"), s.manifests.c.digest == bindparam("digest"))
)
_TAGGED_MANIFEST = (
    select(s.manifests.c.digest, s.manifests.c.media_type, s.manifests.c.size)
    .select_from(s.tags)
    .join(s.repos, s.repos.c.id == s.tags.c.repo_id)
    .join(
        s.manifests,
        and_(s.manifests.c.repo_id == s.tags.c.repo_id, s.manifests.c.digest == s.tags.c.digest),
    )
    .where(s.repos.c.name == bindparam("full"), s.tags.c.name == bindparam("tag"))
)


# Every POST of an upload: the organization's lock (with a session limit), its id, its
# unexpired sessions counted no further than the limit (one range of the index
# reg_uploads_org), the repository's id.
_LOCK_ORG = (
    update(s.orgs)
    .where(s.orgs.c.name == bindparam("org"))
    .values(quota_bytes=s.orgs.c.quota_bytes)
)
_ORG_ID = select(s.orgs.c.id).where(s.orgs.c.name == bindparam("org"))
_REPO_ID = select(s.repos.c.id).where(s.repos.c.name == bindparam("full"))
#: how long an upload session counts against ``--max-uploads`` after it was opened
UPLOAD_CAP_WINDOW = 3600.0
_COUNTED_UPLOADS = (s.uploads.c.org_id == bindparam("org_id"), s.uploads.c.expires_at > bindparam("now"))
_OPEN_UPLOADS = select(func.count()).select_from(
    select(s.uploads.c.expires_at)  # a column of the index: no row is read
    .where(*_COUNTED_UPLOADS)
    .limit(bindparam("limit"))
    .subquery()
)
# The first of them to leave the window, when the cap refuses a session.
_FIRST_COUNTED_EXPIRY = select(func.min(s.uploads.c.expires_at)).where(*_COUNTED_UPLOADS)
# A new repository: the organization's repositories (index reg_repos_org), counted no
# further than the limit.
_ORG_REPOS = select(func.count()).select_from(
    select(s.repos.c.id).where(s.repos.c.org_id == bindparam("org_id")).limit(bindparam("limit")).subquery()
)


class RegistryMetadata:
    def __init__(self, db_url: str) -> None:
        try:
            self.db: Database = open_database(db_url)
        except DatabaseError as e:
            # one line, and never the password of a postgresql:// URL
            orig = getattr(e.__cause__, "orig", None)  # the driver's own error
            if orig is None and e.hint:  # ember's own words already name the database
                raise RegistryError(e.message, hint=e.hint) from None
            detail = (str(orig or e.message).strip().splitlines() or ["unknown error"])[0]
            shown = masked_url(db_url)
            raise RegistryError(f"registry database {shown} is not usable: {detail}") from None

    def warm_up(self) -> None:
        """Open a pooled connection and compile the hot statements once."""
        with self.db.connect() as conn:
            for stmt, params in (
                (_BLOB_SIZE, {"full": "", "digest": ""}),
                (_MANIFEST, {"full": "", "digest": ""}),
                (_TAGGED_MANIFEST, {"full": "", "tag": ""}),
            ):
                conn.execute(stmt, params).first()

    # -- organizations and API tokens ------------------------------------------

    def create_org(self, name: str) -> None:
        check_org_name(name)
        try:
            with self.db.begin() as conn:
                conn.execute(s.orgs.insert().values(name=name, created_at=time.time()))
        except IntegrityError:
            raise OrgExists(f"organization {name!r} already exists") from None

    def _org_id(self, conn: Connection, name: str) -> int:
        row = conn.execute(_ORG_ID, {"org": name}).first()
        if row is None:
            raise OrgNotFound(
                f"no organization {name!r}", hint="create it with `ember admin org create`"
            )
        return int(row.id)

    def list_orgs(self) -> list[OrgInfo]:
        repo_count = (
            select(func.count()).where(s.repos.c.org_id == s.orgs.c.id).scalar_subquery()
        )
        live = or_(s.tokens.c.expires_at.is_(None), s.tokens.c.expires_at > time.time())
        token_count = (
            select(func.count())
            .where(and_(s.tokens.c.org_id == s.orgs.c.id, s.tokens.c.revoked_at.is_(None), live))
            .scalar_subquery()
        )
        with self.db.connect() as conn:
            rows = conn.execute(
                select(
                    s.orgs.c.name, s.orgs.c.created_at, repo_count, token_count,
                    s.orgs.c.quota_bytes, s.orgs.c.id,
                ).order_by(s.orgs.c.name)
            ).all()  # fmt: skip
            now = time.time()
            infos = []
            for name, created, repositories, tokens, quota_bytes, org_id in rows:
                used, uploading = _org_usage(conn, org_id, now)
                infos.append(
                    OrgInfo(name, created, repositories, tokens, used, quota_bytes, uploading)
                )
            return infos

    def set_quota(self, org: str, quota_bytes: int | None) -> None:
        """Limit what ``org``'s repositories may hold (None: no limit)."""
        if quota_bytes is not None and quota_bytes < 0:
            raise ValueError("a quota cannot be negative")
        with self.db.begin() as conn:
            org_id = self._org_id(conn, org)
            conn.execute(
                update(s.orgs).where(s.orgs.c.id == org_id).values(quota_bytes=quota_bytes)
            )

    def quota(
        self, org: str, digest: str | None = None, session: str | None = None
    ) -> Quota | None:
        """The organization's quota and use (None: it has no quota); with ``digest``, also
        whether it holds that blob or manifest already (storing it again then costs
        nothing); with ``session``, the use leaves that upload session's bytes out."""
        with self.db.connect() as conn:
            return _quota(conn, org, digest, session)

    def bounded(self, org: str, digest: str | None = None) -> bool:
        """Whether an upload of ``org`` must fit a quota: it has one, and (with ``digest``)
        does not hold that blob already.  Indexed lookups only, no sum."""
        with self.db.connect() as conn:
            row = conn.execute(
                select(s.orgs.c.id, s.orgs.c.quota_bytes).where(s.orgs.c.name == org)
            ).first()
            if row is None or row[1] is None:
                return False
            return digest is None or not _org_holds(conn, int(row[0]), digest)

    def held_size(self, org: str, digest: str) -> int | None:
        """The size of blob (or manifest) ``digest`` if ``org`` holds it already, else None."""
        with self.db.connect() as conn:
            org_id = conn.execute(select(s.orgs.c.id).where(s.orgs.c.name == org)).scalar()
            if org_id is None:
                return None
            content = _org_content(int(org_id), digest).subquery()
            size = conn.execute(select(content.c.size).limit(1)).scalar()
            return None if size is None else int(size)

    def reserve_upload(
        self, org: str, session: str, need: int, ahead: int = 0, digest: str | None = None
    ) -> int | Quota:
        """Let upload ``session`` hold ``need`` bytes under its organization's quota, and
        up to ``ahead`` more (at most a quarter of the room that leaves: uploads streaming
        at once share what is left instead of the first one taking all of it).  Returns
        the size the session may reach now, or the Quota that refuses ``need`` (the
        session keeps what it held).  No quota, or a ``digest`` the organization holds
        (which costs nothing): ``need + ahead``, and nothing is recorded.

        What the session holds is only ever raised here, never lowered (``settle_upload``
        lowers it, for the request that holds the session): a request that reserves
        before it finds another one streaming to the session (a final PUT during a
        PATCH) would set it to the few bytes the file has so far, under a body allowed
        megabytes, and other sessions would be given that room too.

        One transaction under the organization's lock (``_lock_org``), so that two
        sessions are never given the same room."""
        with self.db.begin() as conn:
            quota = _quota(conn, org, digest, session, lock=True)
            if quota is None or quota.holds:
                return need + ahead
            if need > quota.room:
                return quota
            granted = need + min(ahead, (quota.room - need) // 4)
            held = s.uploads.c.held_bytes
            conn.execute(
                update(s.uploads)
                .where(s.uploads.c.id == session)
                .values(held_bytes=case((held > granted, held), else_=granted))
            )
            return granted

    def settle_upload(self, session: str, size: int) -> None:
        """Upload ``session`` holds ``size`` bytes (what it reserved and did not use is
        given back)."""
        with self.db.begin() as conn:
            conn.execute(
                update(s.uploads).where(s.uploads.c.id == session).values(held_bytes=size)
            )

    def cut_upload(self, session: str, size: int) -> bool:
        """Upload ``session`` holds no more than ``size`` bytes: a reservation that a
        request killed before it settled left above what the session's file holds is
        cut down to it (never raised).  Whether it was."""
        with self.db.begin() as conn:
            cut = conn.execute(
                update(s.uploads)
                .where(s.uploads.c.id == session, s.uploads.c.held_bytes > size)
                .values(held_bytes=size)
            ).rowcount
        return bool(cut)

    def create_token(
        self, org: str, label: str, actions: frozenset[str], expires_at: float | None = None
    ) -> tuple[str, str]:
        """A new API token (id, secret); ``expires_at``: refused from then on (unix s)."""
        check_org_name(org)  # (one that cannot be, non-UTF-8 say, was a traceback)
        check_token_label(label)
        token_id, secret = new_api_token()
        with self.db.begin() as conn:
            org_id = self._org_id(conn, org)
            conn.execute(
                s.tokens.insert().values(
                    id=token_id,
                    org_id=org_id,
                    label=label,
                    hash=hash_api_token(secret),
                    actions=",".join(sorted(actions)),
                    created_at=time.time(),
                    expires_at=expires_at,
                )
            )
        return token_id, secret

    def list_tokens(self, org: str | None = None) -> list[TokenInfo]:
        q = select(
            s.tokens.c.id,
            s.orgs.c.name,
            s.tokens.c.label,
            s.tokens.c.actions,
            s.tokens.c.created_at,
            s.tokens.c.revoked_at,
            s.tokens.c.expires_at,
        ).join(s.orgs, s.orgs.c.id == s.tokens.c.org_id)
        with self.db.connect() as conn:
            if org is not None:
                q = q.where(s.tokens.c.org_id == self._org_id(conn, org))
            rows = conn.execute(q.order_by(s.orgs.c.name, s.tokens.c.created_at)).all()
        return [
            TokenInfo(r[0], r[1], r[2], frozenset(r[3].split(",")), r[4], r[5], r[6]) for r in rows
        ]

    def revoke_token(self, token_id: str) -> None:
        with self.db.begin() as conn:
            done = conn.execute(
                update(s.tokens)
                .where(s.tokens.c.id == token_id, s.tokens.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            ).rowcount
        if not done:
            raise TokenNotFound(f"no active token with id {token_id!r}", hint="see `ember admin token ls`")

    def revoked_since(self, since: float) -> list[str]:
        """Ids of the tokens revoked, or expired, at or after ``since`` (wall-clock
        seconds): an expiry is a revocation the token was made with, and the registry
        tokens made from it (whose own expiry allows for clock skew) go with it."""
        expired = and_(s.tokens.c.expires_at >= since, s.tokens.c.expires_at <= time.time())
        with self.db.connect() as conn:
            rows = conn.execute(
                select(s.tokens.c.id).where(or_(s.tokens.c.revoked_at >= since, expired))
            ).all()
        return [r[0] for r in rows]

    def resolve_token(self, secret: str) -> ResolvedToken | None:
        """What a live API token secret stands for, else None (unknown, revoked, or
        expired).  Its expiry comes with it: a caller that keeps the answer a while
        must refuse it after that time itself."""
        with self.db.connect() as conn:
            row = conn.execute(
                select(s.orgs.c.name, s.tokens.c.id, s.tokens.c.actions, s.tokens.c.expires_at)
                .join(s.orgs, s.orgs.c.id == s.tokens.c.org_id)
                .where(s.tokens.c.hash == hash_api_token(secret), s.tokens.c.revoked_at.is_(None))
            ).first()
        if row is None:
            return None
        found = ResolvedToken(row[0], row[1], frozenset(row[2].split(",")), row[3])
        return None if found.expired(time.time()) else found

    # -- repositories ------------------------------------------------------------

    def _repo_id(self, conn: Connection, full: str) -> int | None:
        row = conn.execute(_REPO_ID, {"full": full}).first()
        return None if row is None else int(row.id)

    def ensure_repo(self, org: str, full: str, max_repositories: int = 0) -> int:
        """The id of repository ``full`` of ``org``, created if need be: refused
        (OrgLimitReached) when the organization has ``max_repositories`` already (0: no
        limit)."""
        with self.db.begin() as conn:
            return self._ensure_repo(conn, org, full, max_repositories)

    def _ensure_repo(self, conn: Connection, org: str, full: str, max_repositories: int) -> int:
        repo_id = self._repo_id(conn, full)
        if repo_id is not None:
            return repo_id  # the common case: no count, no lock
        if max_repositories:
            # counted and created as one decision per organization, so that requests
            # creating repositories at once cannot each take the last one
            _lock_org(conn, org)
            repo_id = self._repo_id(conn, full)  # created by the request that held it
            if repo_id is not None:
                return repo_id
        org_id = self._org_id(conn, org)
        if max_repositories:
            mine = {"org_id": org_id, "limit": max_repositories}
            if conn.execute(_ORG_REPOS, mine).scalar_one() >= max_repositories:
                raise OrgLimitReached(org, "repositories", max_repositories)
        insert_ignore(
            conn, s.repos, [{"org_id": org_id, "name": full, "created_at": time.time()}]
        )
        repo_id = self._repo_id(conn, full)
        assert repo_id is not None
        return repo_id

    def list_repos(self, org: str, n: int, last: str | None) -> list[str]:
        """The org's repositories that hold something: one with only an upload
        started (or a mount refused) is not listed, as Distribution lists none."""
        with self.db.connect() as conn:
            q = (
                select(s.repos.c.name)
                .join(s.orgs, s.orgs.c.id == s.repos.c.org_id)
                .where(s.orgs.c.name == org, _repo_holds_something())
            )
            if last is not None:
                q = q.where(s.repos.c.name > last)
            return [r[0] for r in conn.execute(q.order_by(s.repos.c.name).limit(n))]

    # -- blobs ---------------------------------------------------------------------

    def blob_size(self, full: str, digest: str) -> int | None:
        """Size of ``digest`` if it is linked into repository ``full``; None otherwise."""
        with self.db.connect() as conn:
            row = conn.execute(_BLOB_SIZE, {"full": full, "digest": digest}).first()
        return None if row is None else int(row[0])

    def link_blob(
        self, repo_id: int, digest: str, size: int, quota_org: str | None = None
    ) -> Quota | None:
        """Link ``digest`` into the repository; with ``quota_org``, only if it fits that
        organization's quota (checked and linked in one transaction): else the Quota
        that refuses it, and nothing is linked."""
        with self.db.begin() as conn:
            if quota_org is not None:
                refused = _refusal(conn, quota_org, size, digest)
                if refused is not None:
                    return refused
            _insert_link(conn, repo_id, digest, size)
        return None

    def _delete_in_repo(self, full: str, table: Table, column: str, value: str) -> bool:
        """Delete the row of ``table`` whose ``column`` is ``value`` in repository ``full``."""
        with self.db.begin() as conn:
            repo_id = self._repo_id(conn, full)
            if repo_id is None:
                return False
            return bool(
                conn.execute(
                    delete(table).where(table.c.repo_id == repo_id, table.c[column] == value)
                ).rowcount
            )

    def unlink_blob(self, full: str, digest: str) -> bool:
        return self._delete_in_repo(full, s.blob_links, "digest", digest)

    # -- manifests and tags ------------------------------------------------------

    def manifest(self, full: str, digest: str) -> ManifestRow | None:
        with self.db.connect() as conn:
            row = conn.execute(_MANIFEST, {"full": full, "digest": digest}).first()
        return None if row is None else ManifestRow(row[0], row[1], int(row[2]))

    def tagged_manifest(self, full: str, tag: str) -> ManifestRow | None:
        with self.db.connect() as conn:
            row = conn.execute(_TAGGED_MANIFEST, {"full": full, "tag": tag}).first()
        return None if row is None else ManifestRow(row[0], row[1], int(row[2]))

    def check_references(
        self, full: str, blobs: Mapping[str, int], children: Mapping[str, int]
    ) -> tuple[list[str], list[str]]:
        """(digests not in repository ``full``, digests whose stored size differs from
        the descriptor's) for the blobs and child manifests a manifest references."""
        with self.db.connect() as conn:
            repo_id = self._repo_id(conn, full)
            if repo_id is None:
                return sorted({*blobs, *children}), []
            have: dict[str, int] = {}
            for table, wanted in ((s.blob_links, sorted(blobs)), (s.manifests, sorted(children))):
                for chunk in _chunks(wanted):
                    rows = conn.execute(
                        select(table.c.digest, table.c.size).where(
                            table.c.repo_id == repo_id, table.c.digest.in_(chunk)
                        )
                    )
                    have.update((d, int(size)) for d, size in rows)
        declared = {**blobs, **children}
        missing = sorted(d for d in declared if d not in have)
        wrong = sorted(d for d, size in declared.items() if d in have and have[d] != size)
        return missing, wrong

    def put_manifest(
        self, repo_id: int, m: NewManifest, tag: str | None, quota_org: str | None = None
    ) -> Quota | None:
        """Store the manifest's rows (and tag); with ``quota_org``, only if it fits that
        organization's quota (checked and stored in one transaction): else the Quota that
        refuses it, and nothing is stored."""
        now = time.time()
        with self.db.begin() as conn:
            if quota_org is not None:
                refused = _refusal(conn, quota_org, m.size, m.digest)
                if refused is not None:
                    return refused
            # Pushed again: its GC grace period starts again (GC frees an untagged
            # manifest by its age, and a client pushing an index's children first may
            # take a while to push the index that references them).
            upsert(
                conn,
                s.manifests,
                {"repo_id": repo_id, "digest": m.digest},
                {"created_at": now},
                {
                    "media_type": m.media_type,
                    "size": m.size,
                    "artifact_type": m.artifact_type,
                    "subject": m.subject,
                    "annotations": json.dumps(m.annotations) if m.annotations else None,
                },
            )
            refs = [
                {"repo_id": repo_id, "manifest": m.digest, "child": d, "kind": "blob"}
                for d in m.blobs
            ] + [
                {"repo_id": repo_id, "manifest": m.digest, "child": d, "kind": "manifest"}
                for d in m.children
            ]
            insert_ignore(conn, s.manifest_refs, refs)
            if tag is not None:
                upsert(
                    conn,
                    s.tags,
                    {"repo_id": repo_id, "name": tag},
                    {"digest": m.digest, "updated_at": now},
                )
        return None

    def delete_manifest(self, full: str, digest: str) -> bool:
        with self.db.begin() as conn:
            repo_id = self._repo_id(conn, full)
            if repo_id is None:
                return False
            done = conn.execute(
                delete(s.manifests).where(
                    s.manifests.c.repo_id == repo_id, s.manifests.c.digest == digest
                )
            ).rowcount
            conn.execute(delete(s.tags).where(s.tags.c.repo_id == repo_id, s.tags.c.digest == digest))
            conn.execute(
                delete(s.manifest_refs).where(
                    s.manifest_refs.c.repo_id == repo_id, s.manifest_refs.c.manifest == digest
                )
            )
            return bool(done)

    def delete_tag(self, full: str, tag: str) -> bool:
        return self._delete_in_repo(full, s.tags, "name", tag)

    def list_tags(self, full: str, n: int, last: str | None) -> list[str] | None:
        """Tags in lexical order after ``last``; None if the repository does not exist or
        holds nothing (only an upload started: the catalog does not list it either)."""
        with self.db.connect() as conn:
            row = conn.execute(
                select(s.repos.c.id).where(s.repos.c.name == full, _repo_holds_something())
            ).first()
            if row is None:
                return None
            repo_id = int(row[0])
            q = select(s.tags.c.name).where(s.tags.c.repo_id == repo_id)
            if last is not None:
                q = q.where(s.tags.c.name > last)
            return [r[0] for r in conn.execute(q.order_by(s.tags.c.name).limit(n))]

    def referrers(self, full: str, subject: str, artifact_type: str | None) -> list[Referrer]:
        with self.db.connect() as conn:
            q = (
                select(
                    s.manifests.c.digest,
                    s.manifests.c.media_type,
                    s.manifests.c.size,
                    s.manifests.c.artifact_type,
                    s.manifests.c.annotations,
                )
                .join(s.repos, s.repos.c.id == s.manifests.c.repo_id)
                .where(s.repos.c.name == full, s.manifests.c.subject == subject)
            )
            if artifact_type is not None:
                q = q.where(s.manifests.c.artifact_type == artifact_type)
            rows = conn.execute(q.order_by(s.manifests.c.digest)).all()
        return [
            Referrer(r[0], r[1], int(r[2]), r[3], json.loads(r[4]) if r[4] else None) for r in rows
        ]

    # -- upload sessions -----------------------------------------------------------

    def create_upload(
        self,
        org: str,
        full: str,
        session: str,
        expires_at: float,
        max_uploads: int = 0,
        max_repositories: int = 0,
    ) -> int:
        """Open upload ``session`` in repository ``full`` of ``org`` (created if need be);
        the repository's id.  Refused (OrgLimitReached), with nothing written, when the
        organization has ``max_uploads`` unexpired sessions opened within the last
        ``UPLOAD_CAP_WINDOW`` already (so that abandoned sessions, which only their
        client can cancel, lock it out for an hour at most, not for the 24 h until
        they expire), or would get more
        than ``max_repositories`` (0: no limit).  One transaction under the
        organization's lock: sessions opened at once cannot pass the limit together."""
        now = time.time()
        with self.db.begin() as conn:
            if max_uploads:
                _lock_org(conn, org)
            org_id = self._org_id(conn, org)
            if max_uploads:
                # sessions opened within the last UPLOAD_CAP_WINDOW: those whose expiry
                # lies within that much of the new one's
                since = max(now, expires_at - UPLOAD_CAP_WINDOW)
                open_ = {"org_id": org_id, "now": since, "limit": max_uploads}
                if conn.execute(_OPEN_UPLOADS, open_).scalar_one() >= max_uploads:
                    first = conn.execute(_FIRST_COUNTED_EXPIRY, {"org_id": org_id, "now": since}).scalar_one()
                    raise OrgLimitReached(
                        org, "uploads", max_uploads, retry_after=max(1, math.ceil(first - since))
                    )
            repo_id = self._ensure_repo(conn, org, full, max_repositories)
            conn.execute(
                s.uploads.insert(),
                {"id": session, "repo_id": repo_id, "org_id": org_id, "created_at": now,
                 "expires_at": expires_at},
            )  # fmt: skip
            return repo_id

    def delete_upload(self, session: str) -> None:
        with self.db.begin() as conn:
            conn.execute(delete(s.uploads).where(s.uploads.c.id == session))

    def link_upload(self, repo_id: int, session: str, digest: str, size: int) -> None:
        """An upload published as ``digest``: its link and the end of its session, in one
        transaction, so that its bytes count against the quota once at every moment
        (as the session's, then as the blob's)."""
        with self.db.begin() as conn:
            _insert_link(conn, repo_id, digest, size)
            conn.execute(delete(s.uploads).where(s.uploads.c.id == session))


def _chunks(items: list[str], size: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _insert_link(conn: Connection, repo_id: int, digest: str, size: int) -> None:
    """Link ``digest`` into the repository; linked already (pushed or mounted again), its
    GC grace period starts again: GC frees an unreferenced link by its age, and the
    manifest that will reference it may come a while after its blobs."""
    upsert(
        conn,
        s.blob_links,
        {"repo_id": repo_id, "digest": digest},
        {"created_at": time.time()},
        {"size": size},
    )


def _repo_holds_something() -> ColumnElement[bool]:
    """A repository holds a blob link or a manifest; one with only an upload started (or
    a refused mount) does not exist for clients, as in Distribution."""
    return or_(
        select(s.blob_links.c.repo_id).where(s.blob_links.c.repo_id == s.repos.c.id).exists(),
        select(s.manifests.c.repo_id).where(s.manifests.c.repo_id == s.repos.c.id).exists(),
    )


def _org_content(org_id: int, digest: str | None = None) -> CompoundSelect:
    """The distinct content (digest, size) of the organization's repositories (only
    ``digest``, if given): blobs linked and manifests; UNION counts a digest that two
    repositories, or a link and a manifest, share once."""
    parts = []
    for table in (s.blob_links, s.manifests):
        part = (
            select(table.c.digest, table.c.size)
            .join(s.repos, s.repos.c.id == table.c.repo_id)
            .where(s.repos.c.org_id == org_id)
        )
        parts.append(part if digest is None else part.where(table.c.digest == digest))
    return union(*parts)


def _org_usage(
    conn: Connection, org_id: int, now: float, skip_session: str | None = None
) -> tuple[int, int]:
    """(bytes the organization holds, the part of them its open upload sessions hold).

    One statement: on PostgreSQL (read committed) each statement sees one snapshot, so
    an upload turning into a blob (``link_upload``) is counted once, not twice or never.
    An expired session no longer counts: its URLs no longer work, and GC deletes it.
    """
    content = _org_content(org_id).subquery()
    stored = select(func.coalesce(func.sum(content.c.size), 0)).scalar_subquery()
    open_uploads = (
        select(func.coalesce(func.sum(s.uploads.c.held_bytes), 0))
        .join(s.repos, s.repos.c.id == s.uploads.c.repo_id)
        .where(s.repos.c.org_id == org_id, s.uploads.c.expires_at > now)
    )
    if skip_session is not None:
        open_uploads = open_uploads.where(s.uploads.c.id != skip_session)
    row = conn.execute(select(stored, open_uploads.scalar_subquery())).one()
    return int(row[0]) + int(row[1]), int(row[1])


def _org_holds(conn: Connection, org_id: int, digest: str) -> bool:
    return conn.execute(_org_content(org_id, digest).limit(1)).first() is not None


def _lock_org(conn: Connection, org: str) -> None:
    """Hold the organization's row until the transaction ends: quota decisions of one
    organization (a reservation, a mount, a manifest) then run one at a time, each
    seeing what the one before it committed.  A write rather than SELECT ... FOR
    UPDATE, which SQLite lacks: there, a transaction whose first statement writes takes
    the database's write lock at once and reads the latest state; on PostgreSQL the
    UPDATE locks that one row."""
    conn.execute(_LOCK_ORG, {"org": org})


def _quota(
    conn: Connection, org: str, digest: str | None, session: str | None, *, lock: bool = False
) -> Quota | None:
    """``RegistryMetadata.quota`` on ``conn``; ``lock``: under the organization's lock."""
    if lock:
        _lock_org(conn, org)
    row = conn.execute(
        select(s.orgs.c.id, s.orgs.c.quota_bytes).where(s.orgs.c.name == org)
    ).first()
    if row is None or row[1] is None:
        return None
    org_id = int(row[0])
    holds = digest is not None and _org_holds(conn, org_id, digest)
    used, uploading = _org_usage(conn, org_id, time.time(), session)
    return Quota(int(row[1]), used, uploading, holds)


def _refusal(conn: Connection, org: str, size: int, digest: str) -> Quota | None:
    """Under the organization's lock (to the end of the transaction): the Quota that
    ``size`` more bytes of ``digest`` would pass, or None if they fit."""
    quota = _quota(conn, org, digest, None, lock=True)
    return None if quota is None or quota.allows(size) else quota
