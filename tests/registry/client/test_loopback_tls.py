"""A loopback registry that serves HTTPS (a `registry:2` with a certificate, a
port-forward to a TLS registry): pulled from as Docker does, without the flag."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.registry.client.client import RegistryClient
from ember.registry.client.errors import RegistryError
from ember.registry.client.transport import split_url
from tests.support.images import build_busybox_layout, layout_ref
from tests.support.registry import Registry, running_registry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("tls-registry"), tls=True) as reg:
        subprocess.run(
            ["skopeo", "copy", "-q", "--dest-tls-verify=false",
             layout_ref(build_busybox_layout()), f"docker://{reg.host}/team/busybox:1"],
            check=True, capture_output=True,
        )  # fmt: skip
        yield reg


def test_a_loopback_registry_that_wants_https_gets_it(tls_registry: Registry) -> None:
    # the self-signed certificate is accepted there, as Docker accepts it for loopback
    with RegistryClient(tls_registry.host) as client:
        fetched = client.get_manifest("team/busybox", "1")
        assert fetched.data
        assert client.base_url == f"https://{tls_registry.host}/v2/"


def test_explicit_plain_http_stays_plain(tls_registry: Registry) -> None:
    with (
        RegistryClient(tls_registry.host, plain_http=True) as client,
        pytest.raises(RegistryError, match="serves HTTPS on that port") as err,
    ):
        client.get_manifest("team/busybox", "1")
    assert "leave out --plain-http" in str(err.value)  # was a bare "answered HTTP 400"


def test_only_the_loopback_origin_skips_certificate_checks(tls_registry: Registry) -> None:
    """A redirect from it to another HTTPS host is verified as any HTTPS is."""
    with RegistryClient(tls_registry.host) as client:
        client.get_manifest("team/busybox", "1")
        pool = client.http
        here, _ = split_url(client.base_url)
        elsewhere, _ = split_url("https://registry.example:443/v2/")
        assert pool._context_for(here).check_hostname is False
        assert pool._context_for(elsewhere).check_hostname is True


def test_ember_image_pull_from_it(tls_registry: Registry, tmp_path: Path) -> None:
    ember = str(Path(sys.executable).parent / "ember")
    env = {**os.environ, "EMBER_HOME": str(tmp_path / "home"), "EMBER_AGENT": "0"}
    res = subprocess.run([ember, "image", "pull", f"{tls_registry.host}/team/busybox:1"],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
