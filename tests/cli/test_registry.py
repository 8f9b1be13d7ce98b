"""``ember registry login/logout``: what they take as a registry (the rest runs against real
registries in tests/cli/test_image_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.cli.registry import _normalise_host
from ember.errors import UsageError
from ember.oci.reference import DEFAULT_REGISTRY
from tests.support.cli import ember_env, run_ember


@pytest.mark.parametrize(
    ("given", "host"),
    [
        ("localhost:5000", "localhost:5000"),
        ("  Registry.Example.COM ", "registry.example.com"),
        ("https://index.docker.io/v1/", DEFAULT_REGISTRY),  # what docker login records for Hub
        ("registry-1.docker.io", DEFAULT_REGISTRY),
        ("http://127.0.0.1:5000/", "127.0.0.1:5000"),
        ("localhost:5000/some/repo", "localhost:5000"),  # as the docker CLI: the host alone
    ],
)
def test_a_registry_is_named_as_the_docker_cli_takes_it(given: str, host: str) -> None:
    assert _normalise_host(given) == host


@pytest.mark.parametrize("given", ["", "https://", "/v1/", "a b", "a\tb:5000"])
def test_no_host_is_refused(given: str) -> None:
    with pytest.raises(UsageError, match="invalid registry host"):
        _normalise_host(given)


def test_logout_of_docker_hub_by_its_url(tmp_path: Path) -> None:
    """`docker logout https://index.docker.io/v1/` works; ember said "invalid registry host"."""
    res = run_ember("registry", "logout", "https://index.docker.io/v1/", env=ember_env(tmp_path))
    assert (res.returncode, res.stderr) == (0, f"no stored credentials for {DEFAULT_REGISTRY}\n")
