"""A Debian kernel installed once per test cache, shared by the VM tests (real apt download)."""

from __future__ import annotations

import os
from pathlib import Path

from ember.home import Home
from ember.locks import FileLock
from ember.vm.errors import KernelNotFound
from ember.vm.kernel import KernelInfo, find_kernel, install_kernel


def cache_root() -> Path:
    return Path(os.environ.get("EMBER_TEST_CACHE", "/var/cache/ember-tests"))


def cached_kernel_home() -> Home:
    """An ember home holding only the installed kernel; other homes link to its kernels."""
    root = cache_root() / "kernel-home"
    root.mkdir(parents=True, exist_ok=True)
    home = Home(root)
    with FileLock(cache_root() / ".kernel-home.lock"):
        try:
            find_kernel(home)  # installed by an earlier run: no apt round trip
        except KernelNotFound:
            install_kernel(home)
    return home


def cached_kernel() -> KernelInfo:
    return find_kernel(cached_kernel_home())


def share_kernels(home: Home) -> None:
    """Point ``home``'s kernels dir at the cached one (no second download)."""
    src = cached_kernel_home().kernels
    home.root.mkdir(parents=True, exist_ok=True)
    if not home.kernels.exists():
        home.kernels.symlink_to(src)
