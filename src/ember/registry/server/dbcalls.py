"""Where the request handlers' database calls run: writes (and anything that may wait
on a lock) in a worker thread, short reads on the event loop when that is cheaper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from ember.registry.server.metadata import RegistryMetadata

T = TypeVar("T")


class DbCalls:
    def __init__(self, meta: RegistryMetadata) -> None:
        self._inline_reads = meta.db.engine.dialect.name == "sqlite"

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """A database write (or anything that may wait on a lock): in a worker thread."""
        return await run_in_threadpool(fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A short read query.  SQLite in WAL mode never makes a reader wait, and one
        indexed lookup costs less than the hop to a thread (measured: bench/registry.py),
        so it runs on the event loop; other databases go through a thread."""
        if self._inline_reads:
            return fn(*args)
        return await run_in_threadpool(fn, *args)
