"""Running the real ``ember`` CLI inside a network namespace, against a shared state dir."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ember.home import Home
from tests.support.cli import EMBER as EMBER  # the tests that Popen ember import it from here
from tests.support.cli import ember_env, run_ember
from tests.vm.vmm.kernelcache import share_kernels


def vm_home_fixture(prefix: str) -> Callable[..., Iterator[Home]]:
    """A module-scoped ``vm_home`` fixture: a state dir of its own, its pool closed after."""

    @pytest.fixture(scope="module")
    def vm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
        from ember.snapshots.pool import close_pool

        home = make_vm_home(tmp_path_factory.mktemp(prefix) / "home")
        yield home
        close_pool(home)

    return vm_home


def make_vm_home(root: Path) -> Home:
    """A state dir with a small snapshot pool and the test cache's kernel."""
    root.mkdir(parents=True, exist_ok=True)
    settings = {"pool_size": "4G", "base_size": "1G"}
    (root / "config.json").write_text(json.dumps({"snapshots": settings}))
    home = Home(root)
    share_kernels(home)
    return home


def new_netns() -> str:
    name = f"embvm-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


def delete_netns(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        subprocess.run(["kill", "-9", pid], check=False)
    subprocess.run(["ip", "netns", "del", name], check=False)


@dataclass
class Ember:
    netns: str
    home: Home

    def env(self) -> dict[str, str]:
        accel = {k: None for k in os.environ if k.startswith("EMBER_ACCEL")}
        return ember_env(self.home.root, **accel)

    def __call__(
        self, *args: str, timeout: float = 180, check: bool = False, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_ember(
            *args,
            prefix=["ip", "netns", "exec", self.netns],
            env=self.env(),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            timeout=timeout,
            check=check,
        )

    def inspect(self, name: str) -> dict[str, Any]:
        res = self("inspect", name, check=True)
        data: list[dict[str, Any]] = json.loads(res.stdout)
        return data[0]

    def sh(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command inside the namespace (the "host" the machines run on)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def wait_for(
    ember: Ember, name: str, ok: Callable[[dict[str, Any]], bool], timeout: float = 180
) -> dict[str, Any]:
    """The machine's inspect record once ``ok`` holds for it (the test fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        st = ember.inspect(name)
        if ok(st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


FETCH = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), end="")
except Exception as e:
    print("FAIL", e)
"""


def fetch(ember: Ember, url: str) -> str:
    return ember.sh(sys.executable, "-c", FETCH, url).stdout


def built_template(ember: Ember, image: str, *run_options: str, timeout: float = 180) -> Path:
    """Run a first machine of a shape (``run_options``, e.g. ``-m 320``; it starts the
    template's build unless an earlier run left the template); the template, built."""

    name = f"tpl-{secrets.token_hex(3)}"
    first = ember("run", "--name", name, *run_options, image, "true")
    assert first.returncode == 0, first.stderr
    key = ember.inspect(name)["labels"]["ember.template"]
    assert ember("rm", name).returncode == 0
    state = ember.home.templates / f"{key}.vmstate"
    deadline = time.monotonic() + timeout
    while not state.is_file():
        assert time.monotonic() < deadline, (ember.home.templates / "build.log").read_text()
        time.sleep(0.2)
    return state
