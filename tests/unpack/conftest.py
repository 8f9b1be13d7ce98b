"""Fixtures of the unpack tests: a fresh root and a layer writer per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember.process import reap_exiting
from ember.unpack import sandbox
from tests.unpack.layers import Layers


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("applying layers chroots: run the tests as root")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path / "blobs")


@dataclass(frozen=True)
class ApplierChild:
    """How the tests' applies get their applier child, and what this process held before."""

    spare: bool  # a session child forked ahead (as ``ember agent``'s runner does)
    children_before: frozenset[int]
    fds_before: frozenset[str]


def own_children() -> frozenset[int]:
    """This process's live or unreaped children (the suite's own servers included)."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended since the listing (its children are the process's)
    return frozenset(pids)


@pytest.fixture(params=["forked", "spare"])
def each_applier_child(request: pytest.FixtureRequest) -> Iterator[ApplierChild]:
    """Every test twice: the applier child forked by the apply, and the spare session
    child forked ahead, which the first apply takes (the rest fork their own)."""
    reap_exiting()  # children an earlier test's applies left exiting (reap_later)
    children, fds = own_children(), frozenset(os.listdir("/proc/self/fd"))
    spare = request.param == "spare"
    if spare:
        sandbox.fork_spare_session()
    try:
        yield ApplierChild(spare, children, fds)
    finally:
        leftover = sandbox.dismiss_spare()  # a test that applied nothing: not the next one's
        if leftover is not None:
            os.waitpid(leftover, 0)
