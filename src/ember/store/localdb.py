"""The database layer's host-local path: one SQLite file, through the stdlib.

Tables that only the host's own ember processes read and write (the image
table) live here rather than behind SQLAlchemy, because every CLI command reads
them and importing SQLAlchemy alone costs 0.2-0.3 s per process on this class
of machine, more than the whole host-side work of starting a prepared machine.

It keeps the conventions of ``ember.store.db``: the same file (``$EMBER_HOME/ember.db``,
shared with the registry's SQLAlchemy tables), the same pragmas (WAL, busy
timeout), migrations per area recorded in the same ``ember_migrations`` table and
serialised across processes by the same lock file, so either layer can open a
file the other created.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ember.locks import FileLock
from ember.store.errors import DatabaseBusy, DatabaseError

_MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS ember_migrations (
    area VARCHAR(64) NOT NULL,
    id VARCHAR(128) NOT NULL,
    applied_at DATETIME DEFAULT (CURRENT_TIMESTAMP),
    PRIMARY KEY (area, id)
)
"""

#: sqlite3.Error.sqlite_errorcode of "database is locked" past the busy timeout
_SQLITE_BUSY = 5

#: how SQLAlchemy's SQLite DateTime stores a value: naive, UTC by ember's convention
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def to_db_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime(_TIME_FORMAT)


def from_db_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def migration_lock(db_file: str | Path) -> FileLock:
    """The lock that serialises migrations of the SQLite file ``db_file``, for both
    layers (this one and ``ember.store.db``).  Made 0o666 less the umask, as open()
    makes a file: a database other users may write must not be one only the user who
    first migrated it can lock."""
    return FileLock(Path(f"{db_file}.migrate-lock"), mode=0o666)


@dataclass(frozen=True)
class LocalMigration:
    id: str
    sql: str


class LocalDatabase:
    """One SQLite file; a short-lived connection per transaction (thread-safe by construction)."""

    #: seconds a transaction waits for another process's write lock
    busy_timeout = 30.0

    def __init__(self, path: Path, area: str, migrations: list[LocalMigration]) -> None:
        self.path = path
        self.area = area
        self._migrations = migrations
        self._migrated = False

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: transactions are begun explicitly below
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL, as ember.store.db: a commit is on disk when it returns.  With NORMAL a
            # commit waited for the next checkpoint, which only comes when no other
            # connection is open: after a power cut an `image rm` whose blobs were
            # unlinked could be back, naming blobs that are gone (gc then stopped on
            # it every time), and a pull said done could be lost.
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            raise DatabaseError(f"database {self.path} is not usable: {e}{self._full()}") from None
        conn.row_factory = sqlite3.Row
        return conn

    def _full(self) -> str:
        """What SQLite calls a "disk I/O error" when its WAL files cannot be made is often
        a full file system: say so, or the user goes looking for a damaged database."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return ""
        if st.f_bavail * st.f_frsize >= 1 << 20:
            return ""
        return (f" (the file system under {self.path.parent} is full: free space, e.g. "
                "partial downloads with ember gc --ingest-grace 0)")

    @contextmanager
    def _transaction(self, mode: str) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            conn.execute(f"BEGIN {mode}")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF == _SQLITE_BUSY:
                raise DatabaseBusy(
                    f"database {self.path} is busy: another process held it for over "
                    f"{self.busy_timeout:g} s",
                    hint="try again; a long `ember gc` or registry garbage collection may hold it",
                ) from None
            raise DatabaseError(f"database {self.path}: {e}{self._full()}") from None
        finally:
            conn.close()

    def exists(self) -> bool:
        """Whether the file is there at all (readers of a fresh store need not create it)."""
        return self.path.exists()

    def migrate(self) -> None:
        """Apply this area's pending migrations once (safe across processes)."""
        if self._migrated:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with migration_lock(self.path):
                self._migrate_locked()
        except OSError as e:
            raise DatabaseError(f"database {self.path} is not usable: {e}") from None
        self._migrated = True

    def _migrate_locked(self) -> None:
        try:
            size: int | None = self.path.stat().st_size
        except FileNotFoundError:
            size = None
        if size is None and self._create_locked():
            return
        if size == 0:
            # SQLite takes an empty file for a new database (and makes empty tables in it);
            # under this lock ember leaves none (but the registry's layer, killed between
            # its first connect and first write), so this one lost its contents:
            # taken for new, `image ls` said nothing and `ember gc` removed every blob
            raise DatabaseError(
                f"database {self.path} is empty (0 bytes): it was truncated or damaged, "
                "and the names of the images in the content store are lost",
                hint="restore it from a backup; or remove it (and its -wal, -shm files) to "
                "start anew: ember gc then removes the blobs no image names",
            )
        # Most commands find nothing to do: a read, which waits for no writer (WAL).  The
        # write lock, taken by every process's first use, made `image ls` wait for, and
        # fail behind, any long writer (the registry's garbage collection).
        with self._transaction("DEFERRED") as conn:
            if not self._pending(conn):
                return
        with self._transaction("IMMEDIATE") as conn:
            self._apply_pending(conn)

    def _pending(self, conn: sqlite3.Connection) -> list[LocalMigration]:
        """This area's migrations not applied yet in ``conn``'s database."""
        try:
            done = self._done(conn)
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            return list(self._migrations)  # a file with no migrations table yet
        return [m for m in self._migrations if m.id not in done]

    def _done(self, conn: sqlite3.Connection) -> set[str]:
        """The ids of this area's migrations applied in ``conn``'s database."""
        rows = conn.execute("SELECT id FROM ember_migrations WHERE area = ?", (self.area,))
        return {row[0] for row in rows}

    def _apply_pending(self, conn: sqlite3.Connection) -> None:
        conn.execute(_MIGRATIONS_DDL)
        done = self._done(conn)
        for m in self._migrations:
            if m.id in done:
                continue
            for statement in _statements(m.sql):
                conn.execute(statement)
            conn.execute("INSERT INTO ember_migrations (area, id) VALUES (?, ?)", (self.area, m.id))

    def _create_locked(self) -> bool:
        """A fresh store: build the whole file beside its name and link it into place.

        Creating it in place costs eight fsyncs (the switch to WAL is a journaled
        write, then the migrations, then the checkpoint when the connection
        closes); this costs two, and the file appears complete or not at all.
        False if another layer created the file meanwhile (it is migrated in place).
        """
        from ember.fsutil import fsync_dir  # (tempfile, shutil): not for every `image ls`

        # under the migration lock: any other such file is a creator's that was killed
        for stale in self.path.parent.glob(f".{self.path.name}.*.new*"):
            with suppress(FileNotFoundError):
                stale.unlink()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
        try:
            try:
                conn = sqlite3.connect(tmp, isolation_level=None)
                try:
                    # nothing can be lost: the file is not linked in before its fsync below
                    conn.execute("PRAGMA journal_mode=OFF")
                    conn.execute("PRAGMA synchronous=OFF")
                    conn.execute("BEGIN")
                    self._apply_pending(conn)
                    conn.execute("COMMIT")
                    conn.execute("PRAGMA journal_mode=WAL")
                finally:
                    conn.close()
            except sqlite3.Error as e:
                raise DatabaseError(f"cannot create database {self.path}: {e}") from None
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # a write-ahead log left by a file that is gone would be replayed into this one
            _remove_with_sidecars(self.path, keep_main=True)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
        finally:
            _remove_with_sidecars(tmp)
        fsync_dir(self.path.parent)
        return True

    @contextmanager
    def begin(self) -> Iterator[sqlite3.Connection]:
        """A connection inside a write transaction, committed on success."""
        self.migrate()
        with self._transaction("IMMEDIATE") as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection inside a read transaction (one consistent snapshot)."""
        self.migrate()
        with self._transaction("DEFERRED") as conn:
            yield conn


def _remove_with_sidecars(path: Path, *, keep_main: bool = False) -> None:
    """Remove a database file's write-ahead log and shared-memory index (and the file)."""
    names = ["-wal", "-shm", "-journal"] if keep_main else ["", "-wal", "-shm", "-journal"]
    for suffix in names:
        with suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def _statements(sql: str) -> list[str]:
    """Split a migration's SQL at semicolons (ember's migrations hold no string literals
    with semicolons); ``executescript`` cannot be used inside a transaction."""
    return [s.strip() for s in sql.split(";") if s.strip()]


def like_prefix(text: str) -> str:
    """A LIKE pattern matching strings that start with ``text`` (ESCAPE '/')."""
    escaped = text.replace("/", "//").replace("%", "/%").replace("_", "/_")
    return escaped + "%"

