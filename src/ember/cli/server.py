"""``ember server``: run the multi-tenant OCI registry."""

from __future__ import annotations

import click

from ember.cli.common import home_from_ctx

# ember.registry.server.config.ServerLimits' defaults and LIMIT_ENV's variables, written
# out so that `ember --help` does not import the server (a test checks they agree).
MAX_UPLOADS = 1000
MAX_REPOSITORIES = 10000
UPLOAD_PURGE_INTERVAL = 3600.0


@click.command()
@click.option("--listen", default="127.0.0.1:5000", show_default=True, help="Address to serve on (HOST:PORT).")
@click.option(
    "--db",
    "db_url",
    envvar="EMBER_REGISTRY_DB",
    help="Database URL (default: SQLite in $EMBER_HOME; postgresql://... for many hosts).",
)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Server processes.")
@click.option(
    "--max-uploads",
    type=click.IntRange(0),
    default=MAX_UPLOADS,
    show_default=True,
    envvar="EMBER_REGISTRY_MAX_UPLOADS",
    show_envvar=True,
    help="Unfinished upload sessions an organization may have opened within the last hour "
    "(0: no limit).",
)
@click.option(
    "--max-repositories",
    type=click.IntRange(0),
    default=MAX_REPOSITORIES,
    show_default=True,
    envvar="EMBER_REGISTRY_MAX_REPOSITORIES",
    show_envvar=True,
    help="Repositories an organization may have (0: no limit).",
)
@click.option(
    "--upload-purge-interval",
    type=click.FloatRange(0),
    default=UPLOAD_PURGE_INTERVAL,
    show_default=True,
    envvar="EMBER_REGISTRY_UPLOAD_PURGE_INTERVAL",
    show_envvar=True,
    metavar="SECONDS",
    help="How often the server deletes expired upload sessions and empty repositories "
    "(0: never; `ember admin registry gc` still does).",
)
def server(
    listen: str,
    db_url: str | None,
    workers: int,
    max_uploads: int,
    max_repositories: int,
    upload_purge_interval: float,
) -> None:
    """Serve the OCI registry (/v2/ and /token) for every organization."""
    from ember.registry.server.config import ServerLimits
    from ember.registry.server.serve import serve

    limits = ServerLimits(max_uploads, max_repositories, upload_purge_interval)
    serve(home_from_ctx(), listen, db_url, workers, limits)


commands: list[click.Command] = [server]
