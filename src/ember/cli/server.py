"""``ember server``: run the multi-tenant OCI registry."""

from __future__ import annotations

import click

from ember.cli.common import home_from_ctx


@click.command()
@click.option("--listen", default="127.0.0.1:5000", show_default=True, help="Address to serve on (HOST:PORT).")
@click.option(
    "--db",
    "db_url",
    envvar="EMBER_REGISTRY_DB",
    help="Database URL (default: SQLite in $EMBER_HOME; postgresql://... for many hosts).",
)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Server processes.")
def server(listen: str, db_url: str | None, workers: int) -> None:
    """Serve the OCI registry (/v2/ and /token) for every organization."""
    from ember.registry.server.serve import serve

    serve(home_from_ctx(), listen, db_url, workers)


commands: list[click.Command] = [server]
