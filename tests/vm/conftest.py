"""Fixtures for the guest tests: ember-init built from init/, the busybox image's tree,
the cached Debian kernel."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ember.vm.kernel import KernelInfo
from tests.support.treecmp import umoci_unpack
from tests.vm.vmm.kernelcache import cached_kernel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ember_init() -> Path:
    """``init/build/ember-init``, (re)built with ``make -C init`` (musl-gcc -static)."""
    subprocess.run(["make", "-s", "-C", str(REPO / "init")], check=True, capture_output=True)
    path = REPO / "init" / "build" / "ember-init"
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def busybox_rootfs(busybox_layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox image unpacked by umoci (read-only by convention: copy it)."""
    return umoci_unpack(busybox_layout, "latest", tmp_path_factory.mktemp("busybox") / "bundle")


@pytest.fixture(scope="session")
def kernel() -> KernelInfo:
    """Debian's kernel, installed once per test cache (tests.vm.vmm.kernelcache)."""
    return cached_kernel()
