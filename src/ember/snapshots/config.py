"""Snapshotter settings: the ``"snapshots"`` section of ``$EMBER_HOME/config.json``.

::

    {"snapshots": {"backend": "auto" | "reflink" | "copy",
                   "base_size": "8G",      # the empty ext4 every image chain starts from
                   "pool_size": "64G",     # sparse XFS pool file, only when $EMBER_HOME has no reflinks
                   "check": "top" | "full" | "none",
                   "host_reserve": "1G"}}  # free space kept under a pool file: 0 turns it off
    # check "top" (default): every built layer's superblock (clean unmount, no errors, no
    # journal to replay), and e2fsck -fn of an image's top snapshot, the one machines boot;
    # "full": e2fsck -fn of every layer too; "none": no check

Environment variables ``EMBER_SNAPSHOT_BACKEND``, ``EMBER_SNAPSHOT_BASE_SIZE`` and
``EMBER_SNAPSHOT_POOL_SIZE`` override the file (handy for one command or a test).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from ember import sizes
from ember.config import config_section
from ember.home import Home
from ember.snapshots.errors import SnapshotError

BACKENDS = ("auto", "reflink", "copy")
CHECKS = ("top", "full", "none")
GiB = 1 << 30
DEFAULT_BASE_SIZE = 8 * GiB
DEFAULT_POOL_SIZE = 64 * GiB
DEFAULT_HOST_RESERVE = 1 * GiB
MIN_SIZE = 64 << 20



class ConfigError(SnapshotError):
    pass


def parse_size(value: object, what: str = "size") -> int:
    """A disk or pool size from config.json or the environment: a number of bytes or a
    size in ``ember.sizes``' grammar (``8G``, ``512MiB``), at least 64M, in whole 4 KiB
    blocks."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size like 8G, not {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        try:
            n = sizes.parse_size(value)
        except sizes.InvalidSize:
            n = -1
    else:
        n = -1
    if n < 0:
        raise ConfigError(f"{what} must be a size like 8G or a number of bytes, not {value!r}")
    problem = disk_size_problem(n)
    if problem is not None:
        raise ConfigError(f"{what} {value!r} {problem}")
    return n


def disk_size_problem(n: int) -> str | None:
    """Why ``n`` bytes cannot be a disk's size (None: it can), the words after its name."""
    if n < MIN_SIZE:
        return "is too small (at least 64 MiB)"
    if n > sizes.MAX_SIZE:
        return f"is too large (at most {sizes.MAX_SIZE >> 50} PiB)"
    if n % 4096:
        return "is not a whole number of 4 KiB blocks"
    return None


@dataclass(frozen=True)
class SnapshotConfig:
    backend: str = "auto"
    base_size: int = DEFAULT_BASE_SIZE
    pool_size: int | None = None  # None: DEFAULT_POOL_SIZE capped by free space
    check: str = "top"
    #: with a pool file: no new disk while the file system under it has less free
    host_reserve: int = DEFAULT_HOST_RESERVE

    @classmethod
    def load(cls, home: Home) -> SnapshotConfig:
        section: dict[str, Any] = config_section(home, "snapshots", ConfigError) or {}
        env = {
            "backend": os.environ.get("EMBER_SNAPSHOT_BACKEND"),
            "base_size": os.environ.get("EMBER_SNAPSHOT_BASE_SIZE"),
            "pool_size": os.environ.get("EMBER_SNAPSHOT_POOL_SIZE"),
        }
        overrides = {k: v for k, v in env.items() if v}
        # an error names what the user set: the variable, not the file's key
        origin = {k: f"EMBER_SNAPSHOT_{k.upper()}" for k in overrides}
        return cls.from_dict({**section, **overrides}, origin)

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: dict[str, str] | None = None) -> SnapshotConfig:
        """``origin``: the name to give in errors for a key not from the config file."""

        def label(key: str) -> str:
            return (origin or {}).get(key, f"snapshots.{key}")

        cfg = cls()
        if "backend" in d:
            if d["backend"] not in BACKENDS:
                raise ConfigError(
                    f"{label('backend')} must be one of {', '.join(BACKENDS)}, not {d['backend']!r}"
                )
            cfg = replace(cfg, backend=d["backend"])
        if "base_size" in d:
            cfg = replace(cfg, base_size=parse_size(d["base_size"], label("base_size")))
        if d.get("pool_size") is not None:
            cfg = replace(cfg, pool_size=parse_size(d["pool_size"], label("pool_size")))
        if "check" in d:
            if d["check"] not in CHECKS:
                raise ConfigError(
                    f"snapshots.check must be one of {', '.join(CHECKS)}, not {d['check']!r}"
                )
            cfg = replace(cfg, check=d["check"])
        if "host_reserve" in d:
            reserve = d["host_reserve"]
            cfg = replace(
                cfg,
                host_reserve=0
                if reserve in (0, "0")
                else parse_size(reserve, "snapshots.host_reserve"),
            )
        return cfg
