"""``ember volume`` in a state directory with a real snapshot pool (no VM)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ember.home import Home
from tests.support.cli import ember_env, run_ember

pytestmark = [pytest.mark.root, pytest.mark.integration]


def ember(home: Home, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return run_ember(*args, env=ember_env(home.root), check=ok)


def test_create_ls_inspect_rm(pool_home: Home) -> None:
    home = pool_home
    assert ember(home, "volume", "ls", "-q").stdout == ""  # (no pool made to say so)
    assert ember(home, "volume", "create", "data", "--size", "128M", "-l", "team=a").stdout == "data\n"
    # again: docker prints the name of the one it has; asked for as another, refused
    assert ember(home, "volume", "create", "data").stdout == "data\n"
    other = ember(home, "volume", "create", "data", "--size", "1G", ok=False)
    assert other.returncode == 2 and "volume data already exists, with a size of 128" in other.stderr
    generated = ember(home, "volume", "create").stdout.strip()
    assert len(generated) == 64
    listed = ember(home, "volume", "ls").stdout.splitlines()
    assert listed[0].split() == ["VOLUME", "NAME", "SIZE", "CREATED"]
    assert [line.split()[0] for line in listed[1:]] == sorted(["data", generated])
    (info,) = json.loads(ember(home, "volume", "inspect", "data").stdout)
    assert (info["name"], info["size"], info["labels"], info["machines"]) == (
        "data", 128 << 20, {"team": "a"}, []
    )  # fmt: skip
    assert Path(info["path"]).name == "disk.ext4"
    missing = ember(home, "volume", "inspect", "data", "nope", ok=False)
    assert missing.returncode == 1 and json.loads(missing.stdout)[0]["name"] == "data"
    assert missing.stderr == "ember: no such volume: nope\n"
    for bad, said in ((("create", "x"), "invalid volume name 'x'"),
                      (("create", "ok", "--size", "1M"), "too small")):  # fmt: skip
        res = ember(home, "volume", *bad, ok=False)
        assert res.returncode != 0 and said in res.stderr and "Traceback" not in res.stderr
    removed = ember(home, "volume", "rm", "data", "nope", generated, ok=False)
    assert (removed.returncode, removed.stdout) == (1, f"data\n{generated}\n")
    assert ember(home, "volume", "ls", "--json").stdout.strip() == "[]"
