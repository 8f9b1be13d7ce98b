"""A state directory with a small snapshot pool per test (the volumes live there)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.home import Home
from tests.snapshots.conftest import make_home, teardown_home


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = make_home(tmp_path / "home")
    yield h
    teardown_home(h)
