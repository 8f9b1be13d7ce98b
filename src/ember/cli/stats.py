"""``ember stats``: machines' CPU, memory, network and disk use, as ``docker stats``."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click

from ember.cli.common import home_from_ctx, say_error, warnings_as_messages
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.cli.goformat import Schema, Template
    from ember.home import Home
    from ember.machines.state import MachineState
    from ember.machines.stats import Sample

#: seconds between two screens (docker's)
INTERVAL = 1.0
#: seconds between the two samples of ``--no-stream`` (its CPU column's window)
NO_STREAM_WINDOW = 0.5
_HEADERS = {
    "Container": "MACHINE", "ID": "MACHINE ID", "Name": "NAME", "CPUPerc": "CPU %",
    "MemUsage": "MEM USAGE / LIMIT", "MemPerc": "MEM %", "NetIO": "NET I/O",
    "BlockIO": "BLOCK I/O", "PIDs": "PIDS",
}  # fmt: skip
_TABLE = ("ID", "Name", "CPUPerc", "MemUsage", "MemPerc", "NetIO", "BlockIO", "PIDs")


def _schema() -> Schema:
    from ember.cli.goformat import Schema

    return Schema("ember stats", _HEADERS)


@click.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Show machines that do not run too.")
@click.option("--no-stream", is_flag=True, help="Print one reading and exit.")
@click.option("--no-trunc", is_flag=True, help="Do not shorten machine ids.")
@click.option("--format", "format_text", metavar="TEMPLATE",
              help="docker's template: .Container .ID .Name .CPUPerc .MemUsage .MemPerc .NetIO "
                   ".BlockIO .PIDs, 'table ...' or json.")  # fmt: skip
@click.argument("machines", nargs=-1)
def stats(show_all: bool, no_stream: bool, no_trunc: bool, format_text: str | None,
          machines: tuple[str, ...]) -> None:  # fmt: skip
    """Show what machines use: the VMM's CPU (percent of one CPU) and resident memory
    against the guest's, the bytes the guest received and sent, and its disks' reads
    and writes.  Running machines, or MACHINES; refreshed every second until Ctrl-C
    (--no-stream: once)."""
    from ember.cli.goformat import from_options

    template = from_options(format_text, False, _schema()) if format_text else None
    home = home_from_ctx()
    warnings_as_messages()
    chosen = _machines(home, machines, show_all)
    before = _samples(chosen)
    redraw = not no_stream and sys.stdout.isatty()
    while True:
        time.sleep(NO_STREAM_WINDOW if no_stream else INTERVAL)
        if not no_stream:  # started, restarted (another VMM), ended or removed meanwhile
            chosen = _machines(home, machines, show_all, missing_ok=True)
        now = _samples(chosen)
        text = _render(chosen, before, now, template, no_trunc)
        if redraw:
            text = "\x1b[2J\x1b[H" + text  # docker's: clear the screen, then the table
        click.echo(text, nl=False)
        if no_stream:
            return
        before = now


def _machines(home: Home, refs: tuple[str, ...], show_all: bool, *, missing_ok: bool = False
              ) -> list[MachineState]:  # fmt: skip
    """The machines named (each missing one said, exit 1 if none is found; ``missing_ok``:
    left out quietly, as one removed while the table streams), else the running ones
    (all with ``show_all``), newest first."""
    from ember.machines.lifecycle import refresh
    from ember.machines.state import RUNNING
    from ember.machines.store import MachineStore

    store = MachineStore(home)
    if refs:
        found, failed = [], 0
        for ref in refs:
            try:
                found.append(refresh(home, store.find(ref)))
            except EmberError as e:
                if missing_ok:
                    continue
                say_error(e)
                failed = e.exit_code
        if not found and not missing_ok:
            raise SystemExit(failed or 1)
        return found
    machines, _ = store.scan()
    machines = [refresh(home, m) for m in machines]
    return [m for m in machines if show_all or m.status == RUNNING]


#: a machine's VMM: a restarted machine's samples are not measured against its last VMM's
_VMMKey = tuple[str, int | None, int | None]


def _vmm(m: MachineState) -> _VMMKey:
    return m.id, m.vmm_pid, m.vmm_start


def _samples(machines: list[MachineState]) -> dict[_VMMKey, Sample | None]:
    from ember.machines.statsprobe import sample

    return {_vmm(m): sample(m) for m in machines}


def _render(machines: list[MachineState], before: dict[_VMMKey, Sample | None],
            now: dict[_VMMKey, Sample | None], template: Template | None, no_trunc: bool) -> str:  # fmt: skip
    import os

    from ember.cli.goformat import Row, align
    from ember.machines.stats import Usage, columns, usage

    ticks = os.sysconf("SC_CLK_TCK")
    rows = []
    for m in machines:
        limit = m.vm.memory_mib << 20
        current = now.get(_vmm(m))
        used = (
            Usage.stopped(limit) if current is None
            else usage(before.get(_vmm(m)), current, memory_limit=limit, ticks_per_second=ticks)
        )  # fmt: skip
        ident = m.id if no_trunc else m.short_id
        rows.append({"Container": ident, "ID": ident, "Name": m.name, **columns(used)})
    if template is not None:
        return template.render(Row(r) for r in rows)
    lines = ["\t".join(_HEADERS[k] for k in _TABLE)]
    lines += ["\t".join(r[k] for k in _TABLE) for r in rows]
    return align("".join(line + "\n" for line in lines))


commands: list[click.Command] = [stats]
