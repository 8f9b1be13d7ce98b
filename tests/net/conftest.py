"""Network namespaces for the networking tests: everything ember adds to "the host"
happens inside a namespace the test creates and deletes."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator

import pytest


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        name = f"embt-{secrets.token_hex(4)}"
        sh("ip", "netns", "add", name)
        made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    yield make
    for name in made:
        # killing what still runs inside keeps `ip netns del` from leaving it behind
        pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], check=False)
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def netns(make_netns: Callable[[], str]) -> str:
    return make_netns()
