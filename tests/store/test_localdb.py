"""The stdlib SQLite path: migrations once across processes, coexistence with the
SQLAlchemy layer on one file, and image rows written by the SQLAlchemy-era schema."""

from __future__ import annotations

import multiprocessing
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, Column, DateTime, MetaData, String, Table

from ember.oci.digest import Digest
from ember.store.db import Database
from ember.store.errors import DatabaseError
from ember.store.images import ImageTable, open_image_db
from ember.store.localdb import LocalDatabase, LocalMigration, from_db_time, like_prefix, to_db_time

M, C = Digest.of(b"m"), Digest.of(b"c")

AREA_MIGRATIONS = [
    LocalMigration("0001", "CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT)"),
    LocalMigration("0002", "ALTER TABLE things ADD COLUMN size INTEGER; CREATE INDEX ix ON things (size)"),
]


def _migrate(path: Path) -> None:
    LocalDatabase(path, "test", AREA_MIGRATIONS).migrate()


def test_migrations_apply_once_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_migrate, args=(path,)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    db = LocalDatabase(path, "test", AREA_MIGRATIONS)
    with db.begin() as conn:
        conn.execute("INSERT INTO things (name, size) VALUES ('a', 1)")
    with db.read() as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM ember_migrations WHERE area='test' ORDER BY id")]
        assert [tuple(r) for r in conn.execute("SELECT name, size FROM things")] == [("a", 1)]
    assert ids == ["0001", "0002"]


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    db = LocalDatabase(tmp_path / "x.db", "test", AREA_MIGRATIONS)
    with pytest.raises(RuntimeError), db.begin() as conn:
        conn.execute("INSERT INTO things (name) VALUES ('half')")
        raise RuntimeError("killed half-way")
    with db.read() as conn:
        assert conn.execute("SELECT count(*) FROM things").fetchone()[0] == 0


def test_unusable_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()  # a directory where the file should be
    with pytest.raises(DatabaseError, match="not usable"):
        open_image_db(tmp_path / "db").migrate()


def test_sql_errors_become_database_errors(tmp_path: Path) -> None:
    db = LocalDatabase(tmp_path / "x.db", "test", AREA_MIGRATIONS)
    with pytest.raises(DatabaseError, match="no such table"), db.read() as conn:
        conn.execute("SELECT * FROM missing_table")


def test_shares_its_file_with_the_sqlalchemy_layer(tmp_path: Path) -> None:
    path = tmp_path / "ember.db"
    ImageTable(open_image_db(path)).put(
        "r", manifest_digest=M, config_digest=C, media_type="m", platform="linux/amd64", size=1
    )
    Database(f"sqlite:///{path}").migrate()  # the registry's areas, same ember_migrations
    table = ImageTable(open_image_db(path))
    assert table.get("r") is not None
    with sqlite3.connect(path) as conn:
        areas = {r[0] for r in conn.execute("SELECT DISTINCT area FROM ember_migrations")}
    assert {"images", "registry"} <= areas


def test_reads_rows_the_sqlalchemy_era_schema_wrote(tmp_path: Path) -> None:
    """State directories made before the move: table and rows created through SQLAlchemy."""
    path = tmp_path / "ember.db"
    meta = MetaData()
    old = Table(
        "images", meta,
        Column("reference", String(1024), primary_key=True),
        Column("manifest_digest", String(200), nullable=False, index=True),
        Column("config_digest", String(200), nullable=False),
        Column("media_type", String(255), nullable=False),
        Column("platform", String(100), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("index_digest", String(200), nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )  # fmt: skip
    db = Database(f"sqlite:///{path}")
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    with db.engine.begin() as conn:
        meta.create_all(conn)
        conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS ember_migrations (area VARCHAR(64), id VARCHAR(128), "
            "applied_at DATETIME, PRIMARY KEY (area, id))"
        )
        conn.exec_driver_sql("INSERT INTO ember_migrations VALUES ('images', '0001_create_images', NULL)")
        conn.execute(old.insert().values(
            reference="old", manifest_digest=str(M), config_digest=str(C), media_type="m",
            platform="linux/amd64", size=5, index_digest=None, created_at=created, updated_at=created,
        ))  # fmt: skip
    table = ImageTable(open_image_db(path))
    rec = table.get("old")
    assert rec is not None and rec.created_at == created and rec.manifest_digest == M
    again = table.put(
        "old", manifest_digest=M, config_digest=C, media_type="m", platform="linux/amd64", size=6
    )
    assert again.created_at == created and again.size == 6 and again.updated_at > created


def test_time_and_pattern_helpers() -> None:
    t = datetime(2026, 11, 28, 10, 0, 0, 1, tzinfo=UTC)
    assert from_db_time(to_db_time(t)) == t
    assert like_prefix("a_b%c/") == "a/_b/%c//%"


def _put_many(path: Path, n: int) -> None:
    table = ImageTable(open_image_db(path))
    for i in range(n):
        table.put("same", manifest_digest=M, config_digest=C, media_type="m", platform="p", size=i)


def test_concurrent_writers_of_one_reference_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "ember.db"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_put_many, args=(path, 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert [r.reference for r in ImageTable(open_image_db(path)).list()] == ["same"]


def test_a_fresh_file_appears_whole_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    _migrate(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db", "x.db.migrate-lock"]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = [r[0] for r in conn.execute("SELECT id FROM ember_migrations ORDER BY id")]
        assert ids == ["0001", "0002"]
        conn.execute("INSERT INTO things (name, size) VALUES ('a', 1)")
    finally:
        conn.close()


def test_a_file_another_layer_created_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    other = sqlite3.connect(path)  # as SQLAlchemy's first connection would: the file exists now
    other.execute("CREATE TABLE theirs (id INTEGER)")
    other.commit()
    try:
        _migrate(path)
        tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"theirs", "things", "ember_migrations"} <= tables
    finally:
        other.close()


def test_a_stale_log_of_a_removed_file_is_not_replayed_into_a_new_one(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO things (name) VALUES ('from a store that is gone')")
    wal = Path(f"{old}-wal").read_bytes()  # the log as a crash would leave it
    conn.close()
    path = tmp_path / "x.db"
    Path(f"{path}-wal").write_bytes(wal)
    _migrate(path)
    db = LocalDatabase(path, "test", AREA_MIGRATIONS)
    with db.read() as conn:
        assert conn.execute("SELECT count(*) FROM things").fetchone()[0] == 0
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_what_a_killed_creator_left_is_cleared(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    for leftover in (".x.db.4242.new", ".x.db.4242.new-journal", ".x.db.17.new-wal"):
        (tmp_path / leftover).write_bytes(b"half a database")
    _migrate(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db", "x.db.migrate-lock"]


def _held_writer(path: Path) -> sqlite3.Connection:
    """Another process's long write transaction (the registry's garbage collection)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_a_reader_waits_for_no_writer(tmp_path: Path) -> None:
    """Every process's first use took the write lock (for migrations it almost never
    had to apply): `image ls` behind a long writer waited 30 s, then failed."""
    path = tmp_path / "x.db"
    _migrate(path)
    writer = _held_writer(path)
    try:
        db = LocalDatabase(path, "test", AREA_MIGRATIONS)  # a new process's
        db.busy_timeout = 0.2
        with db.read() as conn:
            assert conn.execute("SELECT count(*) FROM things").fetchone()[0] == 0
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_writer_held_past_the_wait_is_busy_not_broken(tmp_path: Path) -> None:
    from ember.store.errors import DatabaseBusy

    path = tmp_path / "x.db"
    _migrate(path)
    writer = _held_writer(path)
    try:
        db = LocalDatabase(path, "test", AREA_MIGRATIONS)
        db.busy_timeout = 0.2
        with pytest.raises(DatabaseBusy, match="is busy: another process held it") as e, db.begin():
            pass
        assert e.value.hint and "try again" in e.value.hint
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_an_emptied_file_is_not_taken_for_a_new_database(tmp_path: Path) -> None:
    """SQLite takes a 0-byte file for a new database: a truncated ember.db became an
    empty image table, and `ember gc` then removed every blob of the content store."""
    path = tmp_path / "ember.db"
    table = ImageTable(open_image_db(path))
    table.put("example.org/a:1", manifest_digest=M, config_digest=C, media_type="m",
              platform="linux/amd64", size=1)  # fmt: skip
    for side in ("-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)
    path.write_bytes(b"")
    with pytest.raises(DatabaseError, match=r"is empty \(0 bytes\)") as e:
        ImageTable(open_image_db(path)).list()
    assert e.value.hint and "restore it" in e.value.hint
    assert path.stat().st_size == 0  # nothing made in it


def test_commits_are_on_disk_when_they_return(tmp_path: Path) -> None:
    """synchronous=NORMAL: a commit waited for a checkpoint, which another open connection
    put off; after a power cut an `image rm` whose blobs were unlinked was back."""
    db = LocalDatabase(tmp_path / "x.db", "test", AREA_MIGRATIONS)
    with db.read() as conn:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
