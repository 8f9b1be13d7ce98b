"""``ember run`` refuses bad options with one clear line, before anything is created."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.registry.client.proxy import Behaviour, misbehaving_proxy
from tests.support.cli import ember_env, run_ember
from tests.support.images import layer_digests, push_layout
from tests.support.registry import Registry


def ember(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_ember(*args, env=ember_env(home), timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "1:2:3:4"], "invalid -p '1:2:3:4'"),
        (["-p", "8000-8001:80-82"], "must be the same length"),
        (["-p", "1.2.3.4.5:80:80"], "invalid host address"),
        (["-p", "80:80/sctp"], "unknown protocol"),
        (["-e", "BAD KEY=1"], "invalid environment variable name"),
        (["--env-file", "/nonexistent/env"], "cannot read env file"),
        (["--memory", "16"], "--memory"),
        (["--memory", "0"], "--memory: invalid size '0'"),
        (["--cpus", str((os.cpu_count() or 1) + 1)], "this host has only"),
        (["--disk-size", "lots"], "invalid size"),
        (["--name", "no/slashes"], "invalid machine name"),
        (["--network", "Bad-Net"], "invalid network name"),
        (["--network", "-net"], "invalid network name"),
        (["--cpus", "1.5"], "'1.5' is not a whole number of vCPUs"),
        # Docker's special modes were ordinary networks here: "none" with full networking
        (["--network", "none"], "--network none: ember has no machine without a network"),
        (["--network", "host"], "--network host: a machine has a kernel"),
        (["--kernel-modules", "/"], "--kernel-modules needs --kernel"),
        # ember-init's limit: said before a kernel install and an accelerator probe
        (["-u", "u" * 256], "-u: user 'uuuu"),
        (["-u", "a:b:c"], "-u: invalid user 'a:b:c'"),
        # a quote made the guest kernel read the arguments after it as its value
        (["--kernel-arg", 'foo="', "--kernel-arg", "loglevel=7"], "invalid kernel argument"),
        # past 2047 bytes in all the guest hangs before its console, without a word
        (["--kernel-arg", "x" * 256] * 9, "--kernel-arg: 2312 bytes in all"),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    res = ember(tmp_path, "run", *args, "oci:/nonexistent:latest", "true")
    assert res.returncode == 125  # docker run's: ember failed, not the program
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ember: ") and message in lines[0], res.stderr
    assert not (tmp_path / "machines").exists() or not any((tmp_path / "machines").iterdir())


def test_unknown_image(tmp_path: Path) -> None:
    res = ember(tmp_path, "run", "oci:/nonexistent/layout:latest")
    assert res.returncode != 0
    assert res.stderr.startswith("ember: ") and "Traceback" not in res.stderr


def test_args_after_the_image_belong_to_the_program(tmp_path: Path) -> None:
    # `-p 1:2:3:4` after IMAGE is the program's: ember, which refuses that -p of its own
    # before it looks for the image (test_bad_options), complains about the image
    res = ember(tmp_path, "run", "oci:/nonexistent/layout:latest", "-p", "1:2:3:4")
    assert (res.returncode, res.stderr) == (
        125, "ember: /nonexistent/layout is not an OCI image layout (no oci-layout file)\n"
    )


def test_control_commands_on_unknown_machines(tmp_path: Path) -> None:
    for cmd in (["stop", "ghost"], ["kill", "ghost"], ["rm", "ghost"], ["logs", "ghost"],
                ["inspect", "ghost"], ["port", "ghost"], ["wait", "ghost"]):  # fmt: skip
        res = ember(tmp_path, *cmd)
        assert res.returncode != 0
        assert "no such machine: ghost" in res.stderr, (cmd, res.stderr)
    res = ember(tmp_path, "ps", "-a", "--json")
    assert res.returncode == 0 and res.stdout.strip() == "[]"


@pytest.mark.parametrize("kernel", ["/nonexistent/bzImage", "/dev/zero", "/"])
def test_a_configured_kernel_that_is_not_there_is_an_error(
    tmp_path: Path, busybox_layout: Path, kernel: str
) -> None:
    """config.json's kernel.path missing made `run` install and boot Debian's kernel
    instead, exit 0."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"kernel": {"path": kernel}}))
    res = ember(tmp_path, "run", "--rm", f"oci:{busybox_layout}:latest", "true")
    assert res.returncode != 0
    assert "installing" not in res.stderr and "Traceback" not in res.stderr
    assert f"kernel {kernel}" in res.stderr
    assert ("does not exist" if kernel.startswith("/nonexistent") else "is not a regular file") in res.stderr


def test_a_run_that_fails_on_its_kernel_does_not_wait_for_the_image_layers(
    tmp_path: Path, registry: Registry, multilayer_layout: Path
) -> None:
    """`run` pulls an image that is not local beside the rest of its work, from the
    moment its config is checked: a kernel that is not one fails the run while the
    registry still holds a layer back, and cancels the pull (it used to wait for every
    layer first: here, a minute per try of the held one)."""
    ref = push_layout(multilayer_layout, registry, "cliargs/held")
    held = layer_digests(multilayer_layout)[-1]
    bad = tmp_path / "bzImage"
    bad.write_bytes(b"not a kernel\n" * 100)
    home = tmp_path / "home"
    with misbehaving_proxy(registry.host, Behaviour(hold_blobs={held.hex})) as proxy:
        res = run_ember(
            "run", "--rm", "--kernel", str(bad), ref.replace(registry.host, proxy.host, 1),
            "true", env=ember_env(home), timeout=45,
        )  # fmt: skip
        assert any(held.hex in seen.path for seen in proxy.seen)  # it was asked for
    assert res.returncode == 125, res.stderr
    assert f"kernel {bad}" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert run_ember("image", "ls", "--json", env=ember_env(home), check=True).stdout.strip() == "[]"
    assert not (home / "machines").exists() or not any((home / "machines").iterdir())


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"network": {"subnet": "foo"}}, "subnet"),
        ({"snapshots": {"base_size": "lots"}}, "snapshots.base_size"),
        ({"logs": {"max_size": "lots"}}, "logs.max_size"),
    ],
)
def test_a_broken_config_section_fails_the_run_before_any_work(
    tmp_path: Path, busybox_layout: Path, section: dict[str, object], message: str
) -> None:
    """A bad network subnet was found after `run` had installed a kernel with apt and
    probed the accelerator for 10 s (found by QA)."""
    import json

    from ember.home import Home
    from tests.snapshots.conftest import teardown_home

    (tmp_path / "config.json").write_text(json.dumps(section))
    try:
        res = ember(tmp_path, "run", "--rm", f"oci:{busybox_layout}:latest", "true")
        assert res.returncode != 0 and res.stderr.count("\n") <= 2, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr
        # no kernel was installed for it, no snapshot pool set up
        assert not (tmp_path / "kernels").exists() and not (tmp_path / "snapshots").exists()
    finally:
        teardown_home(Home(tmp_path))  # whatever a failing run set up goes
