"""Fixtures of the unpack tests: a fresh root and a layer writer per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unpack.layers import Layers


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("applying layers chroots: run the tests as root")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path / "blobs")
