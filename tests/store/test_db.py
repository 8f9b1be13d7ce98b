"""The database layer: migrations apply once, also with several processes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from sqlalchemy import text

from ember.store import db as dbmod
from ember.store.db import Database, Migration
from ember.store.errors import DatabaseError


def _create_things(conn) -> None:  # type: ignore[no-untyped-def]
    conn.exec_driver_sql("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT)")


def _add_column(conn) -> None:  # type: ignore[no-untyped-def]
    conn.exec_driver_sql("ALTER TABLE things ADD COLUMN size INTEGER")


class _Area:
    AREA = "test"
    MIGRATIONS = [Migration("0001-things", _create_things), Migration("0002-size", _add_column)]


@pytest.fixture()
def test_area(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    sys.modules["ember_test_area"] = _Area  # type: ignore[assignment]
    monkeypatch.setattr(dbmod, "MIGRATION_MODULES", [*dbmod.MIGRATION_MODULES, "ember_test_area"])


def _migrate(url: str) -> None:
    Database(url).migrate()


def test_migrations_apply_once_across_processes(tmp_path: Path, test_area: None) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_migrate, args=(url,)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    db = Database(url)
    with db.begin() as conn:
        conn.execute(text("INSERT INTO things (name, size) VALUES ('a', 1)"))
        ids = conn.execute(text("SELECT id FROM ember_migrations WHERE area='test' ORDER BY id")).all()
    assert [r[0] for r in ids] == ["0001-things", "0002-size"]


def test_unusable_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()  # a directory where the file should be
    with pytest.raises(DatabaseError, match="not usable"):
        Database(f"sqlite:///{tmp_path / 'db'}").migrate()


def test_messages_never_show_a_password() -> None:
    # nothing listens on port 1: connecting fails, and the message must not leak the secret
    with pytest.raises(DatabaseError) as info:
        Database("postgresql+psycopg://ember:s3cret@127.0.0.1:1/ember").migrate()
    assert "s3cret" not in str(info.value)
    assert "127.0.0.1:1" in str(info.value)


def test_a_damaged_database_is_a_clear_error(tmp_path: Path) -> None:
    """A file that is not SQLite, or a table gone: SQLAlchemy tracebacks before."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all, " * 200)
    with pytest.raises(DatabaseError, match="junk.db is not usable"):
        Database(f"sqlite:///{junk}").migrate()
    url = f"sqlite:///{tmp_path / 'ok.db'}"
    db = Database(url)
    with db.begin() as conn:
        conn.execute(text("SELECT count(*) FROM ember_migrations"))
        conn.execute(text("DROP TABLE ember_migrations"))
    with pytest.raises(DatabaseError, match="ok.db is not usable"), db.begin() as conn:
        conn.execute(text("SELECT count(*) FROM ember_migrations"))


def test_a_lock_that_was_not_granted_is_busy_not_damage(tmp_path: Path) -> None:
    """Another writer holding SQLite's lock past the busy timeout said "database ... is not
    usable", and the registry answered 500; it is DatabaseBusy now (a 503 to retry)."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from ember.store.errors import DatabaseBusy

    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    locked = OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
    assert isinstance(db._unusable(locked), DatabaseBusy)
    assert "is busy: database is locked" in str(db._unusable(locked))
    damaged = OperationalError("SELECT ...", {}, sqlite3.OperationalError("no such table: x"))
    assert type(db._unusable(damaged)) is DatabaseError
