"""``ember kernel ...``: install and list guest kernels."""

from __future__ import annotations

from pathlib import Path

import click

from ember.cli import common
from ember.cli.common import home_from_ctx, json_option, print_json


@click.group()
def kernel() -> None:
    """Guest kernels (Debian's linux-image-amd64 by default)."""


@kernel.command("install")
@click.option(
    "--kernel",
    "kernel_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Check a kernel you bring (bzImage or ELF) and extract its ELF now; it is not "
    "made the default: `ember run --kernel PATH` or config.json's kernel.path boots it.",
)
@click.option(
    "--modules",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="With --kernel: its lib/modules/VERSION directory (with modules.dep).",
)
@json_option
def install(kernel_path: Path | None, modules: Path | None, as_json: bool) -> None:
    """Download Debian's kernel through apt and keep it under the state directory.

    Idempotent: an installed kernel is reused.  The host's /boot is never touched.
    """
    # here, not at the top: `ember --help` lists this module's commands (~8 ms)
    from ember.vm.kernel import find_kernel, install_kernel

    home = home_from_ctx()
    if modules is not None and kernel_path is None:
        raise click.UsageError("--modules needs --kernel (Debian's kernel brings its own)")
    if kernel_path is not None:
        info = find_kernel(home, kernel_path, modules)
    else:
        info = install_kernel(home, progress=None if as_json else common.say)  # never wrapped
    if as_json:
        print_json(info.to_json())
    else:
        common.out_console.print(f"kernel {info.version}: {info.vmlinux}")


@kernel.command("ls")
@json_option
def ls(as_json: bool) -> None:
    """List installed kernels."""
    from ember.vm.kernel import default_version, list_kernels

    home = home_from_ctx()
    kernels = list_kernels(home)
    default = default_version(home)
    if as_json:
        print_json([{**k.to_json(), "default": k.version == default} for k in kernels])
        return
    common.print_table(
        ("VERSION", "DEFAULT", "MODULES", "VMLINUX"),
        [
            (k.version, "*" if k.version == default else "", "yes" if k.modules_dir else "no", str(k.vmlinux))
            for k in kernels
        ],
    )
    if not kernels:
        click.echo("no kernel installed: `ember kernel install` takes the host's Debian one", err=True)


commands: list[click.Command] = [kernel]
