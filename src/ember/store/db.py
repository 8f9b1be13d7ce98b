"""The database layer: one SQLAlchemy engine per state directory, and migrations.

SQLite is the embedded default (WAL, busy timeout so that several ember
processes can share it); ``postgresql://`` URLs work for many hosts.

(The host's image table, read by every CLI command, uses the stdlib path in
``ember.store.localdb`` on the same file, with the same migration bookkeeping.)

Migrations are ordered per *area* (``images``, ``registry``, ...) and each is
applied once, inside a transaction, and recorded in ``ember_migrations``.  An
area registers its migrations by listing them in a module named in
``MIGRATION_MODULES``; that module exposes ``AREA: str`` and
``MIGRATIONS: list[Migration]``.  Never edit a migration that has shipped: add
the next one.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    make_url,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.pool import QueuePool

from ember.store.errors import DatabaseBusy, DatabaseError
from ember.store.localdb import migration_lock

#: modules that carry migrations, applied in this order
MIGRATION_MODULES: list[str] = [
    "ember.registry.server.schema",
]


@dataclass(frozen=True)
class Migration:
    id: str
    apply: Callable[[Connection], None]


_meta = MetaData()
_migrations_table = Table(
    "ember_migrations",
    _meta,
    Column("area", String(64), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("applied_at", DateTime(timezone=True), server_default=func.now()),
)


def masked_url(url: str) -> str:
    """``url`` as messages and logs show it: never with its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return "<unparseable database URL>"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns.  With NORMAL, a power loss could take
    # back rows committed since the last checkpoint (links, manifests, tags a push was
    # answered 201 for) while the fsynced blob files they name survived.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


#: connections an engine keeps, and opens past those when all are in use (SQLAlchemy's
#: defaults, named: the registry's request handlers count on them, see dbcalls.py)
POOL_SIZE = 5
POOL_OVERFLOW = 10


class Database:
    #: connections that may be in use at once; one more waits for one to come back
    pool_capacity = POOL_SIZE + POOL_OVERFLOW

    def __init__(self, url: str) -> None:
        self.url = url
        #: the URL as messages show it: never with its password
        self.display_url = masked_url(url)
        kwargs: dict[str, Any] = {"future": True}
        kwargs.update(poolclass=QueuePool, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except ArgumentError:
            raise DatabaseError(
                "the database URL (--db, EMBER_REGISTRY_DB) is not a database URL",
                hint="for example sqlite:////var/lib/ember/registry.db or postgresql://user@host/dbname",
            ) from None
        except ImportError as e:  # mysql://, oracle://: no driver, and no support either
            raise DatabaseError(
                f"cannot open database {self.display_url}: {e}",
                hint="ember supports SQLite (sqlite:////PATH) and PostgreSQL (postgresql://...)",
            ) from e
        except SQLAlchemyError as e:
            raise DatabaseError(f"cannot open database {self.display_url}: {e}") from e
        if self.engine.dialect.name == "sqlite":
            where = self.engine.url.database
            if not where or where == ":memory:" or self.engine.url.query.get("mode") == "memory":
                # every connection would get a new, empty database
                raise DatabaseError(
                    f"{self.display_url} is an in-memory SQLite database: it cannot hold "
                    "ember's tables", hint="give a file: sqlite:////PATH/TO/FILE.db",
                )
            if not where.startswith("file:") and not os.path.isdir(os.path.dirname(os.path.abspath(where))):
                raise DatabaseError(
                    f"cannot open database {self.display_url}: its directory "
                    f"{os.path.dirname(os.path.abspath(where))} does not exist",
                    hint="create it, or give another path",
                )
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._migrated = False
        self._lock = threading.Lock()

    def migrate(self) -> None:
        """Apply every pending migration (idempotent, safe across processes)."""
        with self._lock:
            if self._migrated:
                return
            try:
                with self._process_lock():
                    self._migrate_locked()
            except SADatabaseError as e:  # not a database, or tables it cannot make
                raise self._unusable(e) from e
            self._migrated = True

    def _unusable(self, e: SADatabaseError) -> DatabaseError:
        if _lock_timed_out(e):
            return DatabaseBusy(f"database {self.display_url} is busy: {e.orig}")
        return DatabaseError(f"database {self.display_url} is not usable: {e.orig}")

    @contextmanager
    def _process_lock(self) -> Iterator[None]:
        """Serialise migrations across processes sharing one SQLite file."""
        path = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        if not path or path == ":memory:":
            yield
            return
        with migration_lock(path):
            yield

    def _migrate_locked(self) -> None:
        with self.engine.begin() as conn:
            _meta.create_all(conn)
        for modname in MIGRATION_MODULES:
            mod = importlib.import_module(modname)
            self._apply_area(mod.AREA, mod.MIGRATIONS)

    def _apply_area(self, area: str, migrations: list[Migration]) -> None:
        for m in migrations:
            with self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7262001)")
                done = conn.execute(
                    select(_migrations_table.c.id).where(
                        _migrations_table.c.area == area, _migrations_table.c.id == m.id
                    )
                ).first()
                if done:
                    continue
                m.apply(conn)
                conn.execute(_migrations_table.insert().values(area=area, id=m.id))

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection inside a transaction, committed on success."""
        self.migrate()
        with self._usable(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        self.migrate()
        with self._usable(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _usable(self) -> Iterator[None]:
        """A damaged database (a table gone, a file that is not SQLite, a lock never
        granted) is an error that says which database; a constraint the caller
        expects to catch (IntegrityError) passes through."""
        try:
            yield
        except IntegrityError:
            raise
        except SADatabaseError as e:
            raise self._unusable(e) from e

    def close(self) -> None:
        self.engine.dispose()


def _lock_timed_out(e: SADatabaseError) -> bool:
    """Whether ``e`` is a wait for another writer's lock that ran out (SQLite "database is
    locked", PostgreSQL lock_not_available)."""
    if getattr(e.orig, "pgcode", None) == "55P03":
        return True
    return isinstance(e, OperationalError) and "locked" in str(e.orig)


_cache: dict[str, Database] = {}
_cache_lock = threading.Lock()


def open_database(url: str) -> Database:
    """One Database per URL per process."""
    with _cache_lock:
        db = _cache.get(url)
        if db is None:
            db = _cache[url] = Database(url)
    db.migrate()
    return db


def _dialect_insert(conn: Connection, table: Table) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def insert_ignore(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """INSERT that skips rows whose key exists already (SQLite and PostgreSQL)."""
    if rows:
        conn.execute(_dialect_insert(conn, table).on_conflict_do_nothing(), rows)


def upsert(
    conn: Connection,
    table: Table,
    key: dict[str, Any],
    values: dict[str, Any],
    on_insert: dict[str, Any] | None = None,
) -> None:
    """Insert a row or update the one with the same ``key`` in one statement.

    Race-free where a read-then-write is not: two processes recording the same
    row at once both succeed.  ``on_insert`` holds columns set only for a new row.
    """
    stmt = _dialect_insert(conn, table).values(**key, **values, **(on_insert or {}))
    conn.execute(stmt.on_conflict_do_update(index_elements=list(key), set_=values))
