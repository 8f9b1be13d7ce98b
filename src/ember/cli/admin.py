"""``ember admin``: organizations, API tokens and registry maintenance.

Works on the state directory (and database) directly, with or without a
running server.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from ember.cli import common
from ember.cli.common import home_from_ctx, json_option, print_json
from ember.errors import UsageError
from ember.sizes import human_size

if TYPE_CHECKING:
    from ember.registry.server.metadata import RegistryMetadata

db_option = click.option(
    "--db",
    "db_url",
    envvar="EMBER_REGISTRY_DB",
    help="Registry database URL (default: SQLite in $EMBER_HOME).",
)


def _metadata(db_url: str | None) -> RegistryMetadata:
    # SQLAlchemy (~130 ms) and rich (below) are imported when a command runs, not when
    # `ember --help` or `ember admin --help` list this module's commands
    from ember.registry.server.config import database_url
    from ember.registry.server.metadata import RegistryMetadata

    return RegistryMetadata(database_url(home_from_ctx(), db_url))


#: bounds of --expires-in: a token that expires before it can be handed over is a
#: mistake, and past a century the date no longer formats everywhere
MIN_TOKEN_LIFE_NS = 10**9
MAX_TOKEN_LIFE_NS = 36_500 * 86_400 * 10**9


def _when(ts: float | None) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


@click.group()
def admin() -> None:
    """Administer the registry: organizations, tokens, garbage collection."""


@admin.group()
def org() -> None:
    """Organizations (tenants)."""


@org.command("create")
@click.argument("name")
@db_option
def org_create(name: str, db_url: str | None) -> None:
    """Create organization NAME."""
    _metadata(db_url).create_org(name)
    click.echo(name)


@org.command("ls")
@db_option
@json_option
def org_ls(db_url: str | None, as_json: bool) -> None:
    """List organizations."""
    orgs = _metadata(db_url).list_orgs()
    if as_json:
        print_json(
            [
                {"name": o.name, "created_at": o.created_at, "repositories": o.repositories,
                 "tokens": o.tokens, "used_bytes": o.used_bytes, "upload_bytes": o.upload_bytes,
                 "quota_bytes": o.quota_bytes}
                for o in orgs
            ]
        )  # fmt: skip
        return
    common.print_table(
        ("NAME", "REPOSITORIES", "TOKENS", "USED", "QUOTA", "CREATED (UTC)"),
        [
            (
                o.name, str(o.repositories), str(o.tokens), human_size(o.used_bytes),
                "-" if o.quota_bytes is None else human_size(o.quota_bytes),
                _when(o.created_at),
            )  # fmt: skip
            for o in orgs
        ],
    )


@org.command("quota")
@click.argument("name")
@click.argument("size")
@db_option
def org_quota(name: str, size: str, db_url: str | None) -> None:
    """Limit what organization NAME's repositories may hold: SIZE like 10G, or none.

    Counted: the distinct blobs and manifests of its repositories (what two of its
    repositories share counts once) and the bytes of its unfinished uploads.  Uploads
    and manifests that would pass it are refused; what is stored already stays."""
    from ember.sizes import parse_size

    quota = None if size.lower() in ("none", "unlimited") else parse_size(size)
    _metadata(db_url).set_quota(name, quota)
    click.echo(f"{name}: {'no quota' if quota is None else human_size(quota)}")


@admin.group()
def token() -> None:
    """API tokens: what clients use to log in to the registry."""


@token.command("create")
@click.option("--org", "org_name", required=True, help="Organization the token acts for.")
@click.option("--name", "label", default="", help="A label to recognise the token by.")
@click.option(
    "--access",
    default="pull,push",
    show_default=True,
    help="Comma-separated actions: pull, push, delete (pull must be among them; delete must be asked for).",
)
@click.option(
    "--expires-in", "expires_in", metavar="DURATION", default=None,
    help="Refuse the token after this long (30d, 12h, 90m; default: it does not expire).",
)  # fmt: skip
@db_option
def token_create(
    org_name: str, label: str, access: str, expires_in: str | None, db_url: str | None
) -> None:
    """Create a token; its secret is printed once, as the last line."""
    from ember.durations import parse_duration_ns
    from ember.registry.server.tokens import parse_actions

    try:
        actions = parse_actions(access)
    except ValueError as e:
        raise UsageError(str(e)) from None
    expires_at = None
    if expires_in is not None:
        ns = parse_duration_ns(expires_in)
        if ns is None:
            raise UsageError(
                f"--expires-in {expires_in[:64]!r}: give a duration such as 30d, 12h or 90m"
            )
        if not MIN_TOKEN_LIFE_NS <= ns <= MAX_TOKEN_LIFE_NS:
            raise UsageError(f"--expires-in {expires_in[:64]!r}: from 1s to 100 years (36500d)")
        expires_at = time.time() + ns / 1e9
    token_id, secret = _metadata(db_url).create_token(org_name, label, actions, expires_at)
    until = f", expires {_when(expires_at)} UTC" if expires_at is not None else ""
    click.echo(f"token {token_id} for {org_name} ({','.join(sorted(actions))}{until}); "
               "the secret is shown only now:", err=True)  # fmt: skip
    click.echo(secret)


@token.command("ls")
@click.option("--org", "org_name", help="Only this organization's tokens.")
@db_option
@json_option
def token_ls(org_name: str | None, db_url: str | None, as_json: bool) -> None:
    """List tokens (never their secrets)."""
    tokens = _metadata(db_url).list_tokens(org_name)
    if as_json:
        print_json(
            [
                {"id": t.id, "org": t.org, "name": t.label, "access": sorted(t.actions),
                 "created_at": t.created_at, "revoked_at": t.revoked_at,
                 "expires_at": t.expires_at}
                for t in tokens
            ]
        )
        return
    common.print_table(
        ("ID", "ORG", "NAME", "ACCESS", "CREATED (UTC)", "REVOKED (UTC)", "EXPIRES (UTC)"),
        [
            (t.id, t.org, t.label, ",".join(sorted(t.actions)), _when(t.created_at),
             _when(t.revoked_at), _when(t.expires_at))
            for t in tokens
        ],
    )  # fmt: skip


@token.command("revoke")
@click.argument("token_id")
@db_option
def token_revoke(token_id: str, db_url: str | None) -> None:
    """Revoke token TOKEN_ID (servers refuse it, and the registry tokens made from it, within 5 s)."""
    _metadata(db_url).revoke_token(token_id)
    click.echo(f"revoked {token_id}")


@admin.group()
def registry() -> None:
    """Registry maintenance."""


@registry.command("gc")
@click.option("--grace", type=click.IntRange(0), default=3600, show_default=True,
              help="Seconds new content stays safe from collection (uploads in flight).")
@click.option("--dry-run", is_flag=True,
              help="Report what would be freed or repaired, change nothing.")
@click.option("--delete-untagged", is_flag=True,
              help="Also delete manifests that no tag, index or subject reaches (pushed by "
              "digest, or whose tag moved on; kept by default, as Distribution keeps them).")
@db_option
@json_option
def registry_gc(grace: int, dry_run: bool, delete_untagged: bool, db_url: str | None, as_json: bool) -> None:
    """Free blobs, manifests and upload sessions nothing references any more.

    Also repairs what interrupted requests (kill -9, a crash) left, as the server's
    periodic purge does: upload sessions whose file is gone, upload reservations above
    what their file holds, partial manifest writes."""
    from ember.registry.server.config import registry_root
    from ember.registry.server.gc import collect, repairs_said

    home = home_from_ctx()
    report = collect(
        _metadata(db_url), registry_root(home), grace=grace, dry_run=dry_run,
        delete_untagged=delete_untagged,
    )
    if as_json:
        print_json(report.as_dict())
        return
    free, recover = ("would free", "would recover") if dry_run else ("freed", "recovered")
    click.echo(
        f"{free} {report.manifests} manifests, {report.links} blob links, {report.blobs} blobs "
        f"({report.bytes} bytes), {report.uploads} upload sessions, "
        f"{report.repositories} empty repositories; {recover} from interrupted requests: "
        f"{repairs_said(report)}"
    )


commands: list[click.Command] = [admin]
