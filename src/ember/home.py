"""Where ember keeps its state: ``$EMBER_HOME``.

Default: ``/var/lib/ember`` for root, ``~/.local/share/ember`` otherwise.
Every command and every component asks this module, never builds paths itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.homedir import default_home_dir


def default_home() -> Path:
    return Path(default_home_dir())


@dataclass(frozen=True)
class Home:
    """The layout of one state directory."""

    root: Path

    @classmethod
    def from_env(cls) -> Home:
        return cls(default_home())

    @property
    def content(self) -> Path:
        return self.root / "content"

    @property
    def db_path(self) -> Path:
        """The host's SQLite file (image table, and the registry's tables by default)."""
        return self.root / "ember.db"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def kernels(self) -> Path:
        return self.root / "kernels"

    @property
    def machines(self) -> Path:
        return self.root / "machines"

    @property
    def run(self) -> Path:
        """Runtime state (locks, sockets, pids)."""
        return self.root / "run"

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    def ensure(self) -> Home:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self
