"""What every CLI module shares: the state directory, output helpers, options."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from ember.home import Home

if TYPE_CHECKING:
    from rich.console import Console

    #: progress and messages go to stderr, so stdout stays parseable
    err_console: Console
    out_console: Console


def __getattr__(name: str) -> Any:
    """``err_console`` / ``out_console`` are made on first use: importing rich costs
    ~20 ms that commands which never draw (``ember run`` on its hot path) should not pay."""
    if name not in ("err_console", "out_console"):
        raise AttributeError(name)
    from rich.console import Console

    consoles = {
        "err_console": Console(stderr=True, highlight=False),
        "out_console": Console(highlight=False),
    }
    globals().update(consoles)
    return consoles[name]


def home_from_ctx(ctx: click.Context | None = None) -> Home:
    ctx = ctx or click.get_current_context()
    root = ctx.find_root()
    home = root.obj.get("home") if isinstance(root.obj, dict) else None
    return (home or Home.from_env()).ensure()


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
