"""The registry's tables (area ``registry``) and their migrations.

Times are Unix seconds (floats) so that grace periods compare the same way on
SQLite and PostgreSQL.  Digests are stored as text (``sha256:...``).  Every
row that makes content visible (blob link, manifest, tag) is keyed by the
repository, which is keyed by its organization: that is the tenancy boundary.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text as sa_text
from sqlalchemy.engine import Connection

from ember.store.db import Migration

AREA = "registry"

metadata = MetaData()

orgs = Table(
    "reg_orgs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(63), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    #: bytes the organization may hold: distinct blobs and manifests of its repositories and
    #: its open upload sessions (None: no limit)
    Column("quota_bytes", BigInteger, nullable=True),
)

tokens = Table(
    "reg_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("org_id", Integer, ForeignKey("reg_orgs.id"), nullable=False),
    Column("label", String(200), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("actions", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    #: wall-clock seconds after which the token is refused (NULL: it does not expire)
    Column("expires_at", Float, nullable=True),
)

repos = Table(
    "reg_repos",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("org_id", Integer, ForeignKey("reg_orgs.id"), nullable=False),
    Column("name", String(300), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    # an organization's repositories, for what it stores (quota checks, org ls)
    Index("reg_repos_org", "org_id"),
)

blob_links = Table(
    "reg_blob_links",
    metadata,
    Column("repo_id", Integer, ForeignKey("reg_repos.id"), nullable=False),
    Column("digest", String(200), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    PrimaryKeyConstraint("repo_id", "digest"),
    Index("reg_blob_links_digest", "digest"),
)

manifests = Table(
    "reg_manifests",
    metadata,
    Column("repo_id", Integer, ForeignKey("reg_repos.id"), nullable=False),
    Column("digest", String(200), nullable=False),
    Column("media_type", String(255), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("artifact_type", String(255), nullable=True),
    Column("subject", String(200), nullable=True),
    Column("annotations", Text, nullable=True),  # JSON object, for the referrers API
    Column("created_at", Float, nullable=False),
    PrimaryKeyConstraint("repo_id", "digest"),
    Index("reg_manifests_subject", "repo_id", "subject"),
    Index("reg_manifests_digest", "digest"),
)

# What each manifest references inside its repository (GC marks through these).
manifest_refs = Table(
    "reg_manifest_refs",
    metadata,
    Column("repo_id", Integer, ForeignKey("reg_repos.id"), nullable=False),
    Column("manifest", String(200), nullable=False),
    Column("child", String(200), nullable=False),
    Column("kind", String(8), nullable=False),  # "blob" | "manifest"
    PrimaryKeyConstraint("repo_id", "manifest", "child", "kind"),
    Index("reg_manifest_refs_child", "repo_id", "child"),
)

tags = Table(
    "reg_tags",
    metadata,
    Column("repo_id", Integer, ForeignKey("reg_repos.id"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("digest", String(200), nullable=False),
    Column("updated_at", Float, nullable=False),
    PrimaryKeyConstraint("repo_id", "name"),
)

uploads = Table(
    "reg_uploads",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("repo_id", Integer, ForeignKey("reg_repos.id"), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    #: bytes the session holds or has reserved under its organization's quota (kept up
    #: to date only while the organization has a quota)
    Column("held_bytes", BigInteger, nullable=False, server_default=sa_text("0")),
    #: the repository's organization, copied (set on every row; 0004 filled in older
    #: ones): its open sessions are counted at every POST, by one index range
    Column("org_id", Integer, nullable=True),
    Index("reg_uploads_repo", "repo_id"),
    Index("reg_uploads_org", "org_id", "expires_at"),
)


def _initial(conn: Connection) -> None:
    metadata.create_all(conn)


def _org_quota(conn: Connection) -> None:
    # a database made by 0001 from this module's tables has the column already
    if "quota_bytes" not in {c["name"] for c in sa_inspect(conn).get_columns("reg_orgs")}:
        conn.execute(sa_text("ALTER TABLE reg_orgs ADD COLUMN quota_bytes BIGINT"))


def _quota_uploads(conn: Connection) -> None:
    # upload sessions count against the quota: their bytes, and the indexes that find an
    # organization's sessions and content without a scan (a 0001 database from this
    # module's tables has them already)
    if "held_bytes" not in {c["name"] for c in sa_inspect(conn).get_columns("reg_uploads")}:
        conn.execute(
            sa_text("ALTER TABLE reg_uploads ADD COLUMN held_bytes BIGINT NOT NULL DEFAULT 0")
        )
    for index in (*repos.indexes, *uploads.indexes):  # both had none before 0003
        # by name: the indexes 0003 made (a later one may need a column it lacks)
        if index.name in ("reg_repos_org", "reg_uploads_repo"):
            index.create(conn, checkfirst=True)


def _upload_orgs(conn: Connection) -> None:
    # open sessions are capped per organization: each row names its organization, and
    # (org_id, expires_at) is indexed, so counting them does not go through every
    # repository of the organization
    if "org_id" not in {c["name"] for c in sa_inspect(conn).get_columns("reg_uploads")}:
        conn.execute(sa_text("ALTER TABLE reg_uploads ADD COLUMN org_id INTEGER"))
    conn.execute(
        sa_text(
            "UPDATE reg_uploads SET org_id = "
            "(SELECT org_id FROM reg_repos WHERE reg_repos.id = reg_uploads.repo_id) "
            "WHERE org_id IS NULL"
        )
    )
    for index in uploads.indexes:
        index.create(conn, checkfirst=True)


def _token_expiry(conn: Connection) -> None:
    # API tokens may expire (``admin token create --expires-in``); older ones do not
    if "expires_at" not in {c["name"] for c in sa_inspect(conn).get_columns("reg_tokens")}:
        conn.execute(sa_text("ALTER TABLE reg_tokens ADD COLUMN expires_at FLOAT"))


MIGRATIONS = [
    Migration("0001-initial", _initial),
    Migration("0002-org-quota", _org_quota),
    Migration("0003-quota-uploads", _quota_uploads),
    Migration("0004-upload-orgs", _upload_orgs),
    Migration("0005-token-expiry", _token_expiry),
]
