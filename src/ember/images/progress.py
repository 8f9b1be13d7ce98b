"""Pull progress: a rich display (one bar per blob plus a total) on a terminal, else nothing."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from ember.oci.manifest import Descriptor

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID


class PullProgress:
    """Null display; ``RichPullProgress`` draws.  Callbacks are thread-safe."""

    def __enter__(self) -> PullProgress:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass

    def blob(self, desc: Descriptor, label: str) -> Callable[[int], None]:
        return lambda n: None

    def message(self, text: str) -> None:
        pass


class RichPullProgress(PullProgress):
    def __init__(self, console: Console | None = None) -> None:
        # rich is imported here, not at module level: a pipe never draws, and the
        # import costs ~25 ms of every command's start-up
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._total: TaskID | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> RichPullProgress:
        self._progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def set_total(self, total: int) -> None:
        self._total = self._progress.add_task("total", total=total)

    def message(self, text: str) -> None:
        self._progress.console.print(text)

    def blob(self, desc: Descriptor, label: str) -> Callable[[int], None]:
        task = self._progress.add_task(f"{label} {desc.digest.short}", total=desc.size)

        def advance(n: int) -> None:
            with self._lock:
                self._progress.advance(task, n)
                if self._total is not None:
                    self._progress.advance(self._total, n)

        return advance


def make_progress(enabled: bool | None) -> PullProgress:
    """``None``: draw only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return RichPullProgress() if enabled else PullProgress()
