"""The image table: which local reference names which manifest.

One row per reference (``docker.io/library/debian:latest``, ``oci:/dir:tag``,
...); pulling the same reference again replaces its row, as ``docker pull``
moves a tag.  Blobs live in the content store; this table only names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from sqlite3 import Row

from ember.oci.digest import Digest
from ember.oci.errors import FormatError
from ember.store.errors import DamagedImageRecord
from ember.store.localdb import LocalDatabase, LocalMigration, from_db_time, like_prefix, to_db_time

AREA = "images"

#: the schema SQLAlchemy created for this table before the image table moved to the
#: stdlib layer: state directories from then keep working unchanged
MIGRATIONS: list[LocalMigration] = [
    LocalMigration(
        "0001_create_images",
        """
        CREATE TABLE IF NOT EXISTS images (
            reference VARCHAR(1024) NOT NULL,
            manifest_digest VARCHAR(200) NOT NULL,
            config_digest VARCHAR(200) NOT NULL,
            media_type VARCHAR(255) NOT NULL,
            platform VARCHAR(100) NOT NULL,
            size BIGINT NOT NULL,
            index_digest VARCHAR(200),
            created_at DATETIME NOT NULL,
            updated_at DATETIME NOT NULL,
            PRIMARY KEY (reference)
        );
        CREATE INDEX IF NOT EXISTS ix_images_manifest_digest ON images (manifest_digest)
        """,
    )
]
# size: the sum of the compressed layer sizes plus config and manifest;
# index_digest: the index the manifest was chosen from, when there was one


def open_image_db(path: Path) -> LocalDatabase:
    return LocalDatabase(path, AREA, MIGRATIONS)


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


def _record(m: Row) -> ImageRecord:
    """The row as a record; DamagedImageRecord when a value is not what ember wrote
    (the file was edited or damaged: every image command would trip on it later)."""
    reference = m["reference"]
    try:
        texts = [m[k] for k in ("reference", "media_type", "platform", "created_at", "updated_at")]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("a text column holds something else")
        if isinstance(m["size"], bool) or not isinstance(m["size"], int):
            raise ValueError(f"size is {m['size']!r:.40}")
        return ImageRecord(
            reference=reference,
            manifest_digest=Digest.parse(m["manifest_digest"]),
            config_digest=Digest.parse(m["config_digest"]),
            media_type=m["media_type"],
            platform=m["platform"],
            size=m["size"],
            index_digest=Digest.parse(m["index_digest"]) if m["index_digest"] else None,
            created_at=from_db_time(m["created_at"]),
            updated_at=from_db_time(m["updated_at"]),
        )
    except (ValueError, TypeError, FormatError) as e:
        raise DamagedImageRecord(str(reference), str(e)[:200]) from None


_UPSERT = """
INSERT INTO images (reference, manifest_digest, config_digest, media_type, platform, size,
                    index_digest, created_at, updated_at)
VALUES (:reference, :manifest_digest, :config_digest, :media_type, :platform, :size,
        :index_digest, :now, :now)
ON CONFLICT (reference) DO UPDATE SET
    manifest_digest = excluded.manifest_digest, config_digest = excluded.config_digest,
    media_type = excluded.media_type, platform = excluded.platform, size = excluded.size,
    index_digest = excluded.index_digest, updated_at = excluded.updated_at
"""


class ImageTable:
    def __init__(self, db: LocalDatabase) -> None:
        self.db = db

    def put(
        self,
        reference: str | Sequence[str],
        *,
        manifest_digest: Digest,
        config_digest: Digest,
        media_type: str,
        platform: str,
        size: int,
        index_digest: Digest | None = None,
    ) -> ImageRecord:
        """Record ``reference`` (a re-pull moves the name and keeps its creation time);
        one statement, so two processes recording the same name at once both succeed.
        Several references (``docker load``'s names of one image): all in one
        transaction; the record of the first is returned."""
        references = [reference] if isinstance(reference, str) else list(reference)
        values = {
            "manifest_digest": str(manifest_digest),
            "config_digest": str(config_digest),
            "media_type": media_type,
            "platform": platform,
            "size": size,
            "index_digest": str(index_digest) if index_digest else None,
            "now": to_db_time(datetime.now(UTC)),
        }
        with self.db.begin() as conn:
            for name in references:
                conn.execute(_UPSERT, {**values, "reference": name})
            row = conn.execute(
                "SELECT * FROM images WHERE reference = ?", (references[0],)
            ).fetchone()
        return _record(row)

    def get(self, reference: str) -> ImageRecord | None:
        if not self.db.exists():  # a fresh store: no file to create just to find nothing
            return None
        with self.db.read() as conn:
            row = conn.execute("SELECT * FROM images WHERE reference = ?", (reference,)).fetchone()
        return _record(row) if row else None

    def find_by_digest(self, prefix: str) -> list[ImageRecord]:
        """Records whose manifest digest is, or starts with, ``prefix`` (``sha256:abc...`` or ``abc...``)."""
        text = prefix if ":" in prefix else f"sha256:{prefix}"
        if not self.db.exists():
            return []
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM images WHERE manifest_digest LIKE ? ESCAPE '/' ORDER BY reference",
                (like_prefix(text),),
            ).fetchall()
        return [_record(r) for r in rows]

    def list(self) -> list[ImageRecord]:
        if not self.db.exists():
            return []
        with self.db.read() as conn:
            rows = conn.execute("SELECT * FROM images ORDER BY reference").fetchall()
        return [_record(r) for r in rows]

    def raw_rows(self) -> Sequence[tuple[object, ...]]:
        """Every row's (reference, manifest_digest, config_digest, media_type,
        index_digest) as stored, unchecked: for reading what it can of a damaged record,
        which ``list`` refuses with the whole table."""
        if not self.db.exists():
            return []
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT reference, manifest_digest, config_digest, media_type, index_digest "
                "FROM images ORDER BY reference"
            ).fetchall()
        return [tuple(r) for r in rows]

    def delete(self, reference: str) -> bool:
        with self.db.begin() as conn:
            cur = conn.execute("DELETE FROM images WHERE reference = ?", (reference,))
        return bool(cur.rowcount)
