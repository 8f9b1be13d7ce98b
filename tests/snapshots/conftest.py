"""Per-test state directories with a small snapshot pool, checked for leaks on teardown."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.home import Home
from ember.snapshots.pool import close_pool
from tests.snapshots.leaks import ours

#: settings from the environment that would override a test home's config.json
SNAPSHOT_ENV = ("EMBER_SNAPSHOT_BACKEND", "EMBER_SNAPSHOT_BASE_SIZE", "EMBER_SNAPSHOT_POOL_SIZE")


def make_home(root: Path, **snapshots: object) -> Home:
    root.mkdir(parents=True, exist_ok=True)
    settings = {"pool_size": "4G", "base_size": "1G", **snapshots}
    (root / "config.json").write_text(json.dumps({"snapshots": settings}))
    return Home(root)


def teardown_home(home: Home) -> None:
    close_pool(home)
    mounts, loops = ours(home.root)
    # the kernel clears autoclear loop devices asynchronously: give a loaded host time
    deadline = time.monotonic() + 15
    while loops and time.monotonic() < deadline:
        time.sleep(0.1)
        mounts, loops = ours(home.root)
    shutil.rmtree(home.root, ignore_errors=True)
    assert not mounts, f"mounts left behind: {mounts}"
    assert not loops, f"loop devices left behind: {loops}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in SNAPSHOT_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    """A state directory on the host's ext4: the snapshotter makes an XFS pool file."""
    h = make_home(tmp_path / "home")
    yield h
    teardown_home(h)


@pytest.fixture
def copy_home(tmp_path: Path) -> Iterator[Home]:
    """A state directory forced onto the copy backend."""
    h = make_home(tmp_path / "copy-home", backend="copy")
    yield h
    teardown_home(h)
