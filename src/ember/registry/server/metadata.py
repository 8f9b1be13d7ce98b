"""The registry's metadata in the database: orgs, tokens, repositories, links,
manifests, tags, referrers and upload sessions.

Blocking (SQLAlchemy Core); the HTTP layer calls it from worker threads.
Writes that race between clients (two pushers linking the same layer, two
tag updates) are idempotent inserts or upserts, so concurrency never turns
into an error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import Select, Table, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ember.registry.server import schema as s
from ember.registry.server.errors import OrgExists, OrgNotFound, RegistryError, TokenNotFound
from ember.registry.server.names import check_org_name
from ember.registry.server.tokens import hash_api_token, new_api_token
from ember.store.db import Database, insert_ignore, masked_url, open_database, upsert
from ember.store.errors import DatabaseError


@dataclass(frozen=True)
class OrgInfo:
    name: str
    created_at: float
    repositories: int
    tokens: int
    #: bytes of distinct blobs its repositories hold, and the limit (None: none)
    used_bytes: int = 0
    quota_bytes: int | None = None


@dataclass(frozen=True)
class Quota:
    limit: int
    used: int
    #: the blob asked about is stored in the organization already
    holds: bool = False

    def allows(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes fits (one the organization holds always does)."""
        return self.holds or self.used + size <= self.limit


@dataclass(frozen=True)
class TokenInfo:
    id: str
    org: str
    label: str
    actions: frozenset[str]
    created_at: float
    revoked_at: float | None


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


@dataclass(frozen=True)
class NewManifest:
    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    subject: str | None
    annotations: dict[str, str] | None
    blobs: Mapping[str, int]  # digest -> size its descriptor declares
    children: Mapping[str, int]


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
        row = conn.execute(select(s.orgs.c.id).where(s.orgs.c.name == name)).first()
        if row is None:
            raise OrgNotFound(
                f"no organization {name!r}", hint="create it with `ember admin org create`"
            )
        return int(row.id)

    def list_orgs(self) -> list[OrgInfo]:
        repo_count = (
            select(func.count()).where(s.repos.c.org_id == s.orgs.c.id).scalar_subquery()
        )
        token_count = (
            select(func.count())
            .where(and_(s.tokens.c.org_id == s.orgs.c.id, s.tokens.c.revoked_at.is_(None)))
            .scalar_subquery()
        )
        with self.db.connect() as conn:
            rows = conn.execute(
                select(
                    s.orgs.c.name, s.orgs.c.created_at, repo_count, token_count,
                    s.orgs.c.quota_bytes, s.orgs.c.id,
                ).order_by(s.orgs.c.name)
            ).all()  # fmt: skip
            return [
                OrgInfo(r[0], r[1], r[2], r[3], _org_usage(conn, r[5]), r[4]) for r in rows
            ]

    def set_quota(self, org: str, quota_bytes: int | None) -> None:
        """Limit what ``org``'s repositories may hold (None: no limit)."""
        if quota_bytes is not None and quota_bytes < 0:
            raise ValueError("a quota cannot be negative")
        with self.db.begin() as conn:
            org_id = self._org_id(conn, org)
            conn.execute(
                update(s.orgs).where(s.orgs.c.id == org_id).values(quota_bytes=quota_bytes)
            )

    def quota(self, org: str, digest: str | None = None) -> Quota | None:
        """The organization's quota and use (None: it has no quota); with ``digest``, also
        whether it holds that blob already (storing it again then costs nothing)."""
        with self.db.connect() as conn:
            row = conn.execute(
                select(s.orgs.c.id, s.orgs.c.quota_bytes).where(s.orgs.c.name == org)
            ).first()
            if row is None or row[1] is None:
                return None
            org_id = int(row[0])
            holds = digest is not None and _org_holds(conn, org_id, digest)
            return Quota(int(row[1]), _org_usage(conn, org_id), holds)

    def create_token(self, org: str, label: str, actions: frozenset[str]) -> tuple[str, str]:
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
        ).join(s.orgs, s.orgs.c.id == s.tokens.c.org_id)
        with self.db.connect() as conn:
            if org is not None:
                q = q.where(s.tokens.c.org_id == self._org_id(conn, org))
            rows = conn.execute(q.order_by(s.orgs.c.name, s.tokens.c.created_at)).all()
        return [
            TokenInfo(r[0], r[1], r[2], frozenset(r[3].split(",")), r[4], r[5]) for r in rows
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
        """Ids of the tokens revoked at or after ``since`` (wall-clock seconds)."""
        with self.db.connect() as conn:
            rows = conn.execute(
                select(s.tokens.c.id).where(s.tokens.c.revoked_at >= since)
            ).all()
        return [r[0] for r in rows]

    def resolve_token(self, secret: str) -> tuple[str, str, frozenset[str]] | None:
        """(org, token id, actions) for a live API token secret, else None."""
        with self.db.connect() as conn:
            row = conn.execute(
                select(s.orgs.c.name, s.tokens.c.id, s.tokens.c.actions)
                .join(s.orgs, s.orgs.c.id == s.tokens.c.org_id)
                .where(s.tokens.c.hash == hash_api_token(secret), s.tokens.c.revoked_at.is_(None))
            ).first()
        if row is None:
            return None
        return row[0], row[1], frozenset(row[2].split(","))

    # -- repositories ------------------------------------------------------------

    def _repo_id(self, conn: Connection, full: str) -> int | None:
        row = conn.execute(select(s.repos.c.id).where(s.repos.c.name == full)).first()
        return None if row is None else int(row.id)

    def ensure_repo(self, org: str, full: str) -> int:
        with self.db.begin() as conn:
            repo_id = self._repo_id(conn, full)
            if repo_id is not None:
                return repo_id
            org_id = self._org_id(conn, org)
            insert_ignore(
                conn, s.repos, [{"org_id": org_id, "name": full, "created_at": time.time()}]
            )
            repo_id = self._repo_id(conn, full)
            assert repo_id is not None
            return repo_id

    def list_repos(self, org: str, n: int, last: str | None) -> list[str]:
        """The org's repositories that hold something: one with only an upload
        started (or a mount refused) is not listed, as Distribution lists none."""
        holds = or_(
            select(s.blob_links.c.repo_id).where(s.blob_links.c.repo_id == s.repos.c.id).exists(),
            select(s.manifests.c.repo_id).where(s.manifests.c.repo_id == s.repos.c.id).exists(),
        )
        with self.db.connect() as conn:
            q = (
                select(s.repos.c.name)
                .join(s.orgs, s.orgs.c.id == s.repos.c.org_id)
                .where(s.orgs.c.name == org, holds)
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

    def link_blob(self, repo_id: int, digest: str, size: int) -> None:
        with self.db.begin() as conn:
            insert_ignore(
                conn,
                s.blob_links,
                [{"repo_id": repo_id, "digest": digest, "size": size, "created_at": time.time()}],
            )

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

    def put_manifest(self, repo_id: int, m: NewManifest, tag: str | None) -> None:
        now = time.time()
        with self.db.begin() as conn:
            insert_ignore(
                conn,
                s.manifests,
                [
                    {
                        "repo_id": repo_id,
                        "digest": m.digest,
                        "media_type": m.media_type,
                        "size": m.size,
                        "artifact_type": m.artifact_type,
                        "subject": m.subject,
                        "annotations": json.dumps(m.annotations) if m.annotations else None,
                        "created_at": now,
                    }
                ],
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
        """Tags in lexical order after ``last``; None if the repository does not exist."""
        with self.db.connect() as conn:
            repo_id = self._repo_id(conn, full)
            if repo_id is None:
                return None
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

    def create_upload(self, session: str, repo_id: int, expires_at: float) -> None:
        with self.db.begin() as conn:
            conn.execute(
                s.uploads.insert().values(
                    id=session, repo_id=repo_id, created_at=time.time(), expires_at=expires_at
                )
            )

    def upload_repo(self, session: str) -> str | None:
        """The qualified repository an open upload session belongs to."""
        with self.db.connect() as conn:
            row = conn.execute(
                select(s.repos.c.name)
                .join(s.uploads, s.uploads.c.repo_id == s.repos.c.id)
                .where(s.uploads.c.id == session)
            ).first()
        return None if row is None else row[0]

    def delete_upload(self, session: str) -> None:
        with self.db.begin() as conn:
            conn.execute(delete(s.uploads).where(s.uploads.c.id == session))


def _chunks(items: list[str], size: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _org_blobs(org_id: int) -> Select[tuple[str, int]]:
    """The distinct blobs (digest, size) linked into the organization's repositories."""
    return (
        select(s.blob_links.c.digest, s.blob_links.c.size)
        .join(s.repos, s.repos.c.id == s.blob_links.c.repo_id)
        .where(s.repos.c.org_id == org_id)
        .distinct()
    )


def _org_usage(conn: Connection, org_id: int) -> int:
    blobs = _org_blobs(org_id).subquery()
    return int(conn.execute(select(func.coalesce(func.sum(blobs.c.size), 0))).scalar_one())


def _org_holds(conn: Connection, org_id: int, digest: str) -> bool:
    blobs = _org_blobs(org_id).where(s.blob_links.c.digest == digest).limit(1)
    return conn.execute(blobs).first() is not None
