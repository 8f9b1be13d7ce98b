"""Where the request handlers' database calls run: writes (and anything that may wait
on a lock) in a worker thread, short reads on the event loop when that is cheaper."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from ember.registry.server.metadata import RegistryMetadata

T = TypeVar("T")

#: connections the writes in threads leave to the reads on the event loop (and to the
#: purge's thread)
_KEPT_FOR_READS = 2


class DbCalls:
    def __init__(self, meta: RegistryMetadata) -> None:
        db = meta.db
        self._inline_reads = db.engine.dialect.name == "sqlite"
        self._pool = db.engine.pool
        self._capacity = db.pool_capacity
        # A write waiting for another process's write lock holds its connection the
        # while (up to SQLite's 30 s busy timeout): unbounded, such writes took every
        # connection of the pool, and the next read on the event loop waited for one,
        # every request of this process with it (a HEAD and `GET /v2/` took 30 s).
        # Writes past this many wait here instead, without a thread or a connection.
        self._writers = asyncio.Semaphore(max(1, self._capacity - _KEPT_FOR_READS))

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """A database write (or anything that may wait on a lock): in a worker thread."""
        async with self._writers:
            return await run_in_threadpool(fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A short read query.  SQLite in WAL mode never makes a reader wait, and one
        indexed lookup costs less than the hop to a thread (measured: bench/registry.py),
        so it runs on the event loop, when a connection is free at once (a checkout that
        waits would hold up every request of this process); other databases, and a
        pool in full use, go through a thread."""
        if self._inline_reads and self._free_connection():
            return fn(*args)
        return await run_in_threadpool(fn, *args)

    def _free_connection(self) -> bool:
        checked_out = getattr(self._pool, "checkedout", None)
        return checked_out is None or checked_out() < self._capacity - 1
