"""What every CLI module shares: the state directory, output helpers, options."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import click

from ember.errors import EmberError
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


def warnings_as_messages() -> None:
    """Show the snapshotter's warnings (``logging``, level WARNING) as ``ember: ...`` lines
    on stderr, like the CLI's own messages.

    Without any logging set up, Python prints them bare, which reads like a stray
    line.  Nothing changes when logging was set up already (the caller's own
    configuration, or a test's capture)."""
    import logging  # here: `ember image ls` loads this module and must not pay for it

    class WarningLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                click.echo(f"ember: {printable(record.getMessage())}", err=True)
            except Exception:
                self.handleError(record)

    logger = logging.getLogger("ember")
    if logger.handlers or logging.getLogger().handlers:
        return
    logger.addHandler(WarningLine(logging.WARNING))


def printable(text: str) -> str:
    """``text`` as one line of plain text: newlines, escape sequences and other control
    characters shown escaped (``\\n``, ``\\x1b``), as ``docker ps`` quotes its COMMAND
    column.  For what ember prints that came from outside (an image's values, a tag, a
    tool's last words): a terminal must not act on it, nor a log reader see a line that
    ember did not write."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


#: characters of an error message shown: messages quote what they refuse, and an
#: argument or an image's value may be megabytes long
MESSAGE_LIMIT = 2000


def bounded(message: str) -> str:
    """The message as one line a terminal shows as text (``printable``), cut to
    ``MESSAGE_LIMIT``: it may quote a tag, a file name or a tool's output, and an escape
    sequence in those must not reach the terminal (click strips only colour codes, and
    only when stderr is not one)."""
    if len(message) > MESSAGE_LIMIT:
        message = f"{message[:MESSAGE_LIMIT]}... ({len(message) - MESSAGE_LIMIT} more characters)"
    return printable(message)


def say_error(message: object) -> None:
    """``ember: MESSAGE`` on stderr, as the entry point says an error that ends a
    command: for one a command reports and goes on past (a machine of several)."""
    click.echo(f"ember: {bounded(str(message))}", err=True)


def each_named(names: Sequence[str], action: Callable[[str], object]) -> None:
    """``action`` on each name in turn: the name printed when it succeeds, an error said
    and the rest gone on with when it fails; then the exit status of the one failure, or
    1 for several (``ember volume rm a b``, ``snapshot leases rm``)."""
    failures: list[EmberError] = []
    for name in names:
        try:
            action(name)
            click.echo(name)
        except EmberError as e:
            say_error(e)
            failures.append(e)
    if failures:
        raise SystemExit(failures[0].exit_code if len(failures) == 1 else 1)


def say(text: str) -> None:
    """A status line on stderr (never wrapped: paths and digests stay whole)."""
    click.echo(text, err=True)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def print_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Columns on stdout.  Plain when piped: aligned, two spaces apart, one row a line,
    without rich's ~25 ms import.  On a terminal drawn by rich, but no cell but the last
    column's is ever cut or wrapped: rich fitted tables to the terminal by ending
    references and names with "…", and two that differ only at the end then read the
    same.  The last column wraps first; if the table still does not fit, it is drawn as
    wide as it needs and the terminal wraps its lines (docker never truncates names).
    Every cell is made ``printable`` and never read as rich markup: cells come from
    images and guests (a history's ``RUN echo [bold]`` was a traceback, its escape
    sequences reached the terminal)."""
    rows = [[printable(c) for c in r] for r in rows]
    if not sys.stdout.isatty():
        lines = [list(header), *rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        return
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    last = len(header) - 1
    for i, column in enumerate(header):
        if i == last:
            table.add_column(column)
        else:
            width = max(len(row[i]) for row in [header, *rows])
            table.add_column(column, no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*(Text(c) for c in row))
    # through the module object: a bare name would skip the module's __getattr__
    console: Console = sys.modules[__name__].out_console
    unbounded = console.options.update_width(1 << 16)
    needed = Measurement.get(console, unbounded, table)
    if needed.minimum > console.width:  # the terminal wraps the lines: no cell need wrap
        console = Console(width=needed.maximum, highlight=False)
    console.print(table, crop=False)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")

#: docker's ``--format`` (``ember.cli.goformat`` reads it)
format_option = click.option(
    "--format", "format_text", metavar="FORMAT", default=None,
    help="Print each item with a Go template, as docker: 'table {{.ID}}\\t{{.Names}}', "
    "'{{.Names}}', json (one object a line), table (the default table).",
)  # fmt: skip


class WholeNumber(click.IntRange):
    """An integer option in a range, with one line a person can act on for what is not
    a whole number (click's own: "'1.5' is not a valid integer range.")."""

    def __init__(self, low: int, high: int, unit: str) -> None:
        super().__init__(low, high)
        self.unit = unit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            try:
                int(value.strip())
            except ValueError:
                self.fail(f"{value!r} is not a whole number of {self.unit}", param, ctx)
        return super().convert(value, param, ctx)


def human_duration(seconds: float) -> str:
    """Docker's ``units.HumanDuration``: "Less than a second", "1 second", "5 seconds",
    "About a minute", "3 minutes", "About an hour", "5 hours", "3 days", ..."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def since(when: str | _dt.datetime | None) -> str | None:
    """How long ago ``when`` (a datetime, or an RFC 3339 / ISO 8601 string; without a
    zone: UTC) was, as ``human_duration`` words; None for no time, a string that is
    not a time as it is."""
    if not when:
        return None
    if isinstance(when, str):
        try:
            moment = _dt.datetime.fromisoformat(when)  # Python 3.11: "Z", nanoseconds cut
        except ValueError:
            return printable(when[:40])
    else:
        moment = when
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return human_duration(max(0.0, (_dt.datetime.now(_dt.UTC) - moment).total_seconds()))


def go_time(when: str | None) -> str:
    """An RFC 3339 time as docker's templates print one (``.CreatedAt``: Go's
    ``time.Time`` string of whole seconds, in the local zone): ``2026-11-30 13:00:00
    +0100 CET``; "" for no time, a string that is not a time as it is (printable)."""
    if not when:
        return ""
    try:
        moment = _dt.datetime.fromisoformat(when)
    except ValueError:
        return printable(when[:40])
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    try:
        local = moment.astimezone()
    except (OverflowError, ValueError, OSError):
        # year 1 west of UTC, 9999 east of it (Go's zero time is what crane writes for
        # an image built without a time): it stays in its own zone
        local = moment
    # (the year as Go prints it, four digits: %Y gives "1" for year 1)
    return f"{local.year:04d}" + local.strftime("-%m-%d %H:%M:%S %z %Z")


def ago(when: str | _dt.datetime | None) -> str:
    """``since`` words and " ago" ("" for no time)."""
    words = since(when)
    return "" if words is None else f"{words} ago"
