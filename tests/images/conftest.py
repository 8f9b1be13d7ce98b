from __future__ import annotations

from pathlib import Path

import pytest

from ember.home import Home
from ember.images import ImageService


@pytest.fixture()
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "ember-home").ensure()


@pytest.fixture()
def service(home: Home, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ImageService:
    # never read the host's ~/.docker/config.json
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    return ImageService(home)
