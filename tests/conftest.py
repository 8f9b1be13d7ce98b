"""Session-wide fixtures shared by every test directory.

Real components only: Debian's docker-registry, skopeo, buildah, umoci.
See tests/support/README.md.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.registry import Registry, running_registry

AUTH_USER = "ember"
AUTH_PASSWORD = "ember-test-password"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry without auth on 127.0.0.1; ``.host``, ``.url``."""
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry requiring basic auth; ``.username``, ``.password``, ``.creds``."""
    with running_registry(
        tmp_path_factory.mktemp("auth-registry"), username=AUTH_USER, password=AUTH_PASSWORD
    ) as reg:
        yield reg
