"""The registry fixtures start a real docker-registry that answers the v2 API."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request

import pytest

from tests.support.registry import Registry

pytestmark = pytest.mark.integration


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_registry_answers_v2(registry: Registry) -> None:
    assert registry.host.startswith("127.0.0.1:")
    assert registry.url == f"http://{registry.host}"
    assert _get(f"{registry.url}/v2/") == 200
    assert _get(f"{registry.url}/v2/nothing/manifests/latest") == 404


def test_auth_registry_requires_credentials(auth_registry: Registry) -> None:
    assert auth_registry.username and auth_registry.password
    assert _get(f"{auth_registry.url}/v2/") == 401
    assert _get(f"{auth_registry.url}/v2/", ("ember", "wrong")) == 401
    creds = (auth_registry.username, auth_registry.password)
    assert _get(f"{auth_registry.url}/v2/", creds) == 200


def test_registries_are_separate(registry: Registry, auth_registry: Registry) -> None:
    assert registry.host != auth_registry.host
    assert registry.storage != auth_registry.storage
