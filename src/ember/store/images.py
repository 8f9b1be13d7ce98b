"""The image table: which local reference names which manifest.

One row per reference (``docker.io/library/debian:latest``, ``oci:/dir:tag``,
...); pulling the same reference again replaces its row, as ``docker pull``
moves a tag.  Blobs live in the content store; this table only names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, DateTime, MetaData, String, Table, delete, select
from sqlalchemy.engine import Connection

from ember.oci.digest import Digest
from ember.store.db import Database, Migration, upsert

AREA = "images"

_meta = MetaData()
images_table = Table(
    "images",
    _meta,
    Column("reference", String(1024), primary_key=True),
    Column("manifest_digest", String(200), nullable=False, index=True),
    Column("config_digest", String(200), nullable=False),
    Column("media_type", String(255), nullable=False),
    Column("platform", String(100), nullable=False),
    # sum of the compressed layer sizes plus config and manifest
    Column("size", BigInteger, nullable=False),
    # the index the manifest was chosen from, when there was one
    Column("index_digest", String(200), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def _create_images(conn: Connection) -> None:
    images_table.create(conn)


MIGRATIONS: list[Migration] = [Migration("0001_create_images", _create_images)]


@dataclass(frozen=True)
class ImageRecord:
    reference: str
    manifest_digest: Digest
    config_digest: Digest
    media_type: str
    platform: str
    size: int
    index_digest: Digest | None
    created_at: datetime
    updated_at: datetime

    def as_dict(self) -> dict[str, object]:
        return {
            "reference": self.reference,
            "manifest_digest": str(self.manifest_digest),
            "config_digest": str(self.config_digest),
            "media_type": self.media_type,
            "platform": self.platform,
            "size": self.size,
            "index_digest": str(self.index_digest) if self.index_digest else None,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything ember stores is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _record(row: object) -> ImageRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return ImageRecord(
        reference=m["reference"],
        manifest_digest=Digest.parse(m["manifest_digest"]),
        config_digest=Digest.parse(m["config_digest"]),
        media_type=m["media_type"],
        platform=m["platform"],
        size=m["size"],
        index_digest=Digest.parse(m["index_digest"]) if m["index_digest"] else None,
        created_at=_aware(m["created_at"]),
        updated_at=_aware(m["updated_at"]),
    )


class ImageTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    def put(
        self,
        reference: str,
        *,
        manifest_digest: Digest,
        config_digest: Digest,
        media_type: str,
        platform: str,
        size: int,
        index_digest: Digest | None = None,
    ) -> ImageRecord:
        now = datetime.now(UTC)
        values = {
            "manifest_digest": str(manifest_digest),
            "config_digest": str(config_digest),
            "media_type": media_type,
            "platform": platform,
            "size": size,
            "index_digest": str(index_digest) if index_digest else None,
            "updated_at": now,
        }
        with self.db.begin() as conn:
            upsert(conn, images_table, {"reference": reference}, values, {"created_at": now})
        got = self.get(reference)
        assert got is not None
        return got

    def get(self, reference: str) -> ImageRecord | None:
        with self.db.connect() as conn:
            row = conn.execute(
                select(images_table).where(images_table.c.reference == reference)
            ).first()
        return _record(row) if row else None

    def find_by_digest(self, prefix: str) -> list[ImageRecord]:
        """Records whose manifest digest is, or starts with, ``prefix`` (``sha256:abc...`` or ``abc...``)."""
        text = prefix if ":" in prefix else f"sha256:{prefix}"
        with self.db.connect() as conn:
            rows = conn.execute(
                select(images_table).where(
                    images_table.c.manifest_digest.startswith(text, autoescape=True)
                )
            ).all()
        return [_record(r) for r in rows]

    def list(self) -> list[ImageRecord]:
        with self.db.connect() as conn:
            rows = conn.execute(select(images_table).order_by(images_table.c.reference)).all()
        return [_record(r) for r in rows]

    def delete(self, reference: str) -> bool:
        with self.db.begin() as conn:
            result = conn.execute(delete(images_table).where(images_table.c.reference == reference))
        return bool(result.rowcount)
