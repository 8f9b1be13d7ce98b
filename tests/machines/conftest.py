"""Fixtures of the machine VM tests: each module defines its own ``vm_home`` (a state
dir, with whatever config.json the module needs); these build on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.home import Home
from tests.machines.vmkit import Ember, delete_netns, new_netns
from tests.support.images import layout_ref


@pytest.fixture
def ember(vm_home: Home) -> Iterator[Ember]:
    """The ``ember`` CLI inside a network namespace of its own, on the module's state dir."""
    ns = new_netns()
    try:
        yield Ember(ns, vm_home)
    finally:
        delete_netns(ns)


@pytest.fixture(scope="module")
def busybox(busybox_layout: Path) -> str:
    return layout_ref(busybox_layout)
