"""What a fresh ``ember`` process imports on its hot paths.

A command's start-up is paid by every run outside the agent, and a top-level
import added anywhere on the way (SQLAlchemy, rich, the registry client...)
costs it silently.  Each case runs one command in a fresh interpreter, in a
fresh state directory, with stdout a pipe, and lists the modules it loaded:
the heavy ones that command does not use must not be among them, and the
ones it does use must be (so that the check sees what it claims to see).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from ember.cli import main as cli_main

# Runs the CLI in-process as the entry point does, then writes sys.modules
# (taken before anything else is imported here) to the file named by argv[1].
_PROBE = """
import sys
from ember.cli.main import main
code = 0
try:
    main(sys.argv[2:])
except SystemExit as e:
    code = e.code
loaded = list(sys.modules)
with open(sys.argv[1], "w") as f:
    f.write("\\n".join(loaded))
sys.exit(code)
"""

#: never needed before a command runs (nor by --version / --help)
_STARTUP_HEAVY = (
    "rich",
    "sqlalchemy",
    "sqlite3",
    "httpx",
    "ssl",
    "zstandard",
    "isal",
    "tarfile",
    "concurrent.futures",
    "logging",
    "subprocess",
    "secrets",
)
#: ember packages a command brings in only when it runs
_EMBER_WORK = (
    "ember.images",
    "ember.unpack",
    "ember.store",
    "ember.registry",
    "ember.machines",
    "ember.snapshots",
    "ember.vm",
    "ember.net",
)


def _loaded(prefixes: tuple[str, ...], modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def run_probe(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    out = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.txt"
    env = {**os.environ, "EMBER_HOME": str(tmp_path / "home"), "EMBER_AGENT": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, set(out.read_text().split("\n"))


def test_import_and_version_load_no_command_module(tmp_path: Path) -> None:
    proc, modules = run_probe(tmp_path, "--version")
    assert proc.stdout.strip().startswith("ember, version ")
    assert "click" in modules and "ember.cli.main" in modules
    assert _loaded(_STARTUP_HEAVY + _EMBER_WORK, modules) == []
    # no command module, and not even the state directory's layout (pathlib)
    assert _loaded(("ember.cli",), modules) == ["ember.cli", "ember.cli.main"]
    assert _loaded(("ember.home", "pathlib"), modules) == []


def test_help_lists_every_command_without_their_dependencies(tmp_path: Path) -> None:
    proc, modules = run_probe(tmp_path, "--help")
    commands = proc.stdout.split("Commands:")[1].splitlines()
    listed = {line.split()[0] for line in commands if line.strip()}
    assert listed == set(cli_main.COMMAND_MODULES)
    # the short help comes from each command module, which --help imports ...
    assert "ember.cli.admin" in modules and "ember.cli.kernel" in modules
    # ... but not what those commands use when they run
    used_when_run = ("sqlalchemy", "rich", "httpx", "ember.registry.server", "ember.vm.kernel")
    assert _loaded(used_when_run, modules) == []


def test_image_ls_on_a_fresh_store_reads_only_the_image_table(tmp_path: Path) -> None:
    proc, modules = run_probe(tmp_path, "image", "ls")
    assert proc.stdout.split() == ["REFERENCE", "DIGEST", "PLATFORM", "SIZE", "PULLED"]
    assert "ember.store.images" in modules
    heavy = tuple(m for m in _STARTUP_HEAVY if m != "sqlite3") + ("shutil",)
    assert _loaded(heavy, modules) == []
    pull_machinery = ("ember.images", "ember.unpack", "ember.registry", "ember.store.content")
    assert _loaded(pull_machinery, modules) == []


def test_ps_without_running_machines_skips_the_lifecycle_layer(tmp_path: Path) -> None:
    proc, modules = run_probe(tmp_path, "ps", "-a")
    assert proc.stdout.split()[:2] == ["MACHINE", "ID"]
    assert "ember.machines.store" in modules
    assert _loaded(("ember.machines.lifecycle", "ember.vm", "ember.net", "rich", "subprocess",
                    "secrets", "concurrent.futures"), modules) == []  # fmt: skip


@pytest.mark.integration
def test_unpack_of_a_local_gzip_image_loads_no_registry_or_zstd_code(
    tmp_path: Path, multilayer_layout: Path
) -> None:
    ref = f"oci:{multilayer_layout}:latest"
    proc, modules = run_probe(tmp_path, "image", "unpack", ref, str(tmp_path / "root"))
    assert "unpacked" in proc.stderr
    assert (tmp_path / "root" / "bin" / "busybox").is_file()
    assert "ember.unpack" in modules and "isal.igzip" in modules
    assert _loaded(("httpx", "ssl", "sqlalchemy", "rich", "zstandard", "isal.igzip_threaded",
                    "ember.images.dockerarchive", "ember.images.registrysource"), modules) == []  # fmt: skip

    # the listing a pipe gets: whole references (rich cut them at 80 columns), aligned
    listed = subprocess.run(
        [str(Path(sys.executable).with_name("ember")), "image", "ls"],
        capture_output=True,
        text=True,
        env={**os.environ, "EMBER_HOME": str(tmp_path / "home"), "EMBER_AGENT": "0"},
        timeout=120,
    )
    lines = listed.stdout.splitlines()
    assert len(lines) == 2 and len(lines[1]) > 80, listed.stdout
    assert lines[1].split()[0] == ref
    assert lines[0].index("DIGEST") == lines[1].index(lines[1].split()[1])


def test_every_declared_command_module_defines_its_command() -> None:
    group = cli_main.cli
    with click.Context(group) as ctx:
        for name in cli_main.COMMAND_MODULES:
            cmd = group.get_command(ctx, name)
            assert cmd is not None and cmd.name == name
