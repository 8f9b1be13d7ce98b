"""Session-wide fixtures shared by every test directory.

Real components only: Debian's docker-registry, skopeo, buildah, umoci.
See tests/support/README.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember.home import Home
from tests.support import images
from tests.support.passstore import PassStore, pass_store
from tests.support.registry import Registry, running_registry
from tests.support.treecmp import umoci_unpack


def pytest_configure(config: pytest.Config) -> None:
    """Commands the tests start read no terminal: run from one, the suite's `ember`
    commands would see it as their stdin, and the client runs those itself rather
    than through an agent (docs/agent.md); CI has none.  Tests that need a terminal
    make a pty of their own."""
    if os.isatty(0):
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)

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


@pytest.fixture(scope="session")
def docker_pass_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PassStore]:
    """A real Docker credential store (docker-credential-pass over pass and gpg); a test
    reaches it with ``monkeypatch.setenv`` of each item of its ``.env``."""
    with pass_store(tmp_path_factory.mktemp("pass")) as store:
        yield store


# Test images: OCI layouts (tag "latest") built once and cached under
# $EMBER_TEST_CACHE; shared between tests and runs, so treat them as read-only
# (tests.support.images.copy_layout makes a private copy).


@pytest.fixture(scope="session")
def busybox_layout() -> Path:
    """Scratch image: busybox-static, users root/app(1000)/extra(2000); same as `make demo`."""
    return images.build_busybox_layout()


@pytest.fixture(scope="session")
def debian_layout() -> Path:
    """debootstrap --variant=minbase bookworm, one layer (first build takes minutes)."""
    return images.build_debian_layout()


@pytest.fixture(scope="session")
def debian_rootfs(debian_layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The debian image unpacked by umoci, once per session (read-only by convention:
    copy it to change anything)."""
    return umoci_unpack(debian_layout, "latest", tmp_path_factory.mktemp("debian") / "bundle")


@pytest.fixture(scope="session")
def multilayer_layout() -> Path:
    """buildah --layers image over busybox: whiteouts, opaque dirs, links, xattr, full config."""
    return images.build_multilayer_layout()


@pytest.fixture(scope="session")
def zstd_layout() -> Path:
    """The multilayer image with zstd-compressed layers."""
    return images.build_zstd_layout()


@pytest.fixture(scope="session")
def multiarch_layout() -> Path:
    """An OCI index: linux/amd64 busybox and a linux/arm64 entry (never run)."""
    return images.build_multiarch_layout()


@pytest.fixture(scope="session")
def busybox_docker_archive() -> Path:
    """The busybox image as a `docker save` tarball (for `docker-archive:FILE`)."""
    return images.build_docker_archive()


@pytest.fixture(scope="session")
def sized_layout() -> Callable[[int], Path]:
    """``sized_layout(mib) -> Path``: busybox + a layer with ``mib`` MiB of random bytes."""
    return images.build_sized_layout


@pytest.fixture(scope="session")
def push_layout() -> Callable[..., str]:
    """``push_layout(layout, registry, repo, tag="latest", creds=None, *, format=None)``
    -> ``"HOST/REPO:TAG"`` (``format="v2s2"``: Docker schema 2 media types)."""
    return images.push_layout


@pytest.fixture
def pool_home(tmp_path: Path) -> Iterator[Home]:
    """A state directory with a small snapshot pool (XFS on a loop device), checked for
    leaked mounts and loop devices on teardown."""
    from tests.snapshots.conftest import make_home, teardown_home

    h = make_home(tmp_path / "home")
    yield h
    teardown_home(h)
