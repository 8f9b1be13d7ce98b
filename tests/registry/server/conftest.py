"""Fixtures: a running ember server with two organizations, ``acme`` and ``beta``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.registry.server.support import EmberServer, Tenant


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmberServer]:
    srv = EmberServer(tmp_path_factory.mktemp("ember-server"))
    srv.create_org("acme")
    srv.create_org("beta")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def acme(server: EmberServer) -> Tenant:
    """acme with pull, push and delete."""
    return Tenant(server, "acme", server.create_token("acme", "pull,push,delete", "admin"))


@pytest.fixture(scope="module")
def acme_pusher(server: EmberServer) -> Tenant:
    """acme with pull and push only (no delete)."""
    return Tenant(server, "acme", server.create_token("acme", "pull,push", "ci"))


@pytest.fixture(scope="module")
def beta(server: EmberServer) -> Tenant:
    return Tenant(server, "beta", server.create_token("beta", "pull,push,delete"))


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Callable[[], EmberServer]]:
    """A private server (for crash tests); started on demand, stopped afterwards."""
    started: list[EmberServer] = []

    def make() -> EmberServer:
        srv = EmberServer(tmp_path / "home")
        srv.create_org("acme")
        started.append(srv.start())
        return srv

    yield make
    for srv in started:
        srv.stop()
