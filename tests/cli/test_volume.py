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


def _machine_using(home: Home, volumes: list[str]) -> None:
    """A stopped machine whose record names ``volumes`` (no VM needed to use one)."""
    import secrets

    from ember.machines import state as mstate
    from ember.machines.state import MachineState, VMConfig
    from ember.machines.store import MachineStore

    st = MachineState(
        id=secrets.token_hex(32), name="", created_at=mstate.now(), config={},
        image="oci:/x:latest", image_digest="sha256:" + "0" * 64, command=["true"],
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1, volumes=volumes),
        status=mstate.EXITED, exit_code=0, finished_at=mstate.now(),
    )  # fmt: skip
    MachineStore(home).create(st, "user")


def test_ls_filters_rm_force_and_prune(pool_home: Home) -> None:
    home = pool_home
    for name, labels in (("used", ["-l", "team=a"]), ("idle-a", ["-l", "team=a"]), ("idle-b", [])):
        ember(home, "volume", "create", name, "--size", "64M", *labels)
    _machine_using(home, ["used:/data"])

    def ls(*filters: str) -> list[str]:
        return ember(home, "volume", "ls", "-q", *(x for f in filters for x in ("-f", f))).stdout.split()

    assert ls("dangling=true") == ["idle-a", "idle-b"]
    assert ls("dangling=false") == ["used"]
    assert ls("label=team=a") == ["idle-a", "used"]
    assert ls("label=team", "dangling=1") == ["idle-a"]
    assert ls("name=^idle", "name=used") == ["idle-a", "idle-b", "used"]
    assert ls("name=-b$") == ["idle-b"]
    for bad, said in (("dangling=maybe", "true or false"), ("size=1", "invalid filter 'size'"),
                      ("name=(", "invalid filter 'name=('"), ("nokey", "expected KEY=VALUE")):  # fmt: skip
        res = ember(home, "volume", "ls", "-f", bad, ok=False)
        assert res.returncode == 2 and said in res.stderr and "Traceback" not in res.stderr

    # rm -f: a name with no volume is no error (docker's); one in use still is
    res = ember(home, "volume", "rm", "-f", "nope", "used", ok=False)
    assert (res.returncode, res.stdout) == (1, "nope\n")
    assert "volume used is in use by machine user" in res.stderr

    # prune: nothing without --all (ember makes no anonymous volumes); --all needs --force
    # off a terminal; it keeps what a machine uses and what the label filter leaves out
    res = ember(home, "volume", "prune")
    assert res.stdout == "Total reclaimed space: 0 B\n" and "--all" in res.stderr
    res = ember(home, "volume", "prune", "-a", ok=False)
    assert res.returncode == 2 and "--force" in res.stderr
    assert ls() == ["idle-a", "idle-b", "used"]
    res = ember(home, "volume", "prune", "-a", "-f", "--filter", "label=team=a")
    assert res.stdout.startswith("Deleted Volumes:\nidle-a\n\nTotal reclaimed space: ")
    assert ls() == ["idle-b", "used"]
    bad = ember(home, "volume", "prune", "-a", "-f", "--filter", "dangling=false", ok=False)
    assert bad.returncode == 2 and "invalid filter 'dangling'" in bad.stderr
    res = ember(home, "volume", "prune", "--all", "--force")
    assert res.stdout.startswith("Deleted Volumes:\nidle-b\n\n")
    assert ls() == ["used"]
