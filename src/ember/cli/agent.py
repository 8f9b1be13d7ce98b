"""``ember agent``: serve this host's ember commands from one resident process."""

from __future__ import annotations

import click

from ember.cli.common import home_from_ctx


@click.command("agent")
@click.option(
    "--no-prefault", is_flag=True,
    help="Let the waiting runner share the agent's memory (saves ~36 MB; each command "
    "then takes the copy-on-write faults itself, ~10 ms of a pull).",
)  # fmt: skip
@click.pass_context
def agent(ctx: click.Context, no_prefault: bool) -> None:
    """Run ember's commands for this state directory without a Python start each.

    Stays in the foreground until SIGTERM or Ctrl-C (run it under a service
    manager; with systemd use KillMode=process so that stopping the agent does
    not kill the commands and machines it started).  While it runs, `ember`
    hands every command to it through $EMBER_HOME/run/agent.sock; without it,
    or with EMBER_AGENT=0, commands run as before.
    """
    from ember.agent.server import Agent

    Agent(home_from_ctx(ctx), prefault_runners=not no_prefault).serve()


commands = [agent]
