from __future__ import annotations

from pathlib import Path

import pytest

from ember.home import Home
from ember.images import ImageService
from tests.support.images import push_layout
from tests.support.registry import Registry


@pytest.fixture()
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "ember-home").ensure()


@pytest.fixture()
def service(home: Home, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ImageService:
    # never read the host's ~/.docker/config.json
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    return ImageService(home)


@pytest.fixture(scope="session")
def debian_ref(registry: Registry, debian_layout: Path) -> str:
    """The debian image (one big layer, ~49 MB, so a cut or a stall lands mid-blob) in
    the session's registry, pushed once: ``REPO:TAG`` (no host)."""
    push_layout(debian_layout, registry, "images/debian")
    return "images/debian:latest"
