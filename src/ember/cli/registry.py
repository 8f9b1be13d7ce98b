"""``ember registry login/logout HOST``: credentials for pulling from registries."""

from __future__ import annotations

import sys

import click

from ember.cli.common import home_from_ctx
from ember.errors import UsageError
from ember.oci.reference import DEFAULT_REGISTRY, DOCKER_HUB_API_HOST
from ember.registry.client.credentials import Credentials, CredentialStore


def _normalise_host(given: str) -> str:
    # as the docker CLI: a URL's scheme and path go (``https://index.docker.io/v1/``,
    # what ``docker login`` itself records for Docker Hub, is Docker Hub)
    host = given.strip().lower().removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    if not host or any(c.isspace() for c in host):
        raise UsageError(f"invalid registry host {given[:100]!r}: give HOST or HOST:PORT")
    return DEFAULT_REGISTRY if host in ("index.docker.io", "registry-1.docker.io") else host


@click.group()
def registry() -> None:
    """Log in to and out of image registries."""


@registry.command()
@click.argument("host")
@click.option("-u", "--username", help="User name (asked for when missing).")
@click.option("-p", "--password", help="Password (prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--plain-http", is_flag=True, help="Talk plain HTTP to this registry.")
def login(
    host: str, username: str | None, password: str | None, password_stdin: bool, plain_http: bool
) -> None:
    """Check credentials against HOST and store them (mode 0600 under the state directory)."""
    host = _normalise_host(host)
    if password is not None and password_stdin:
        raise UsageError("give either --password or --password-stdin, not both")
    if (username is None or (password is None and not password_stdin)) and not sys.stdin.isatty():
        # a prompt would read the piped input, or end in "interrupted" at its end
        missing = "a password" if username is not None else "a user name or password"
        raise UsageError(
            f"cannot ask for {missing}: standard input is not a terminal",
            hint="give --password-stdin" if username is not None
            else "give --username and --password-stdin",
        )
    if username is None:
        username = click.prompt("Username")
    if password_stdin:
        stdin = sys.stdin
        line = (
            stdin.buffer.readline() if hasattr(stdin, "buffer")
            else stdin.readline().encode("utf-8", "surrogateescape")
        )  # fmt: skip
        try:
            password = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise UsageError("the password on standard input is not valid UTF-8") from None
    elif password is None:
        password = click.prompt("Password", hide_input=True)
    if not username or not password:
        raise UsageError("a user name and a password are needed")
    from ember.registry.client.client import RegistryClient  # http.client, ssl: only here

    creds = Credentials(username, password)
    api_host = DOCKER_HUB_API_HOST if host == DEFAULT_REGISTRY else host
    from ember.registry.client.errors import AuthenticationFailed

    with RegistryClient(
        host, api_host=api_host, plain_http=plain_http, credentials=creds, retries=1
    ) as client:
        try:
            client.ping()
        except AuthenticationFailed as e:
            raise AuthenticationFailed(e.message) from None  # its hint is this very command
    CredentialStore(home_from_ctx().credentials).save(host, creds)
    click.echo(f"logged in to {host} as {username}", err=True)


@registry.command()
@click.argument("host")
def logout(host: str) -> None:
    """Forget the stored credentials for HOST."""
    host = _normalise_host(host)
    if CredentialStore(home_from_ctx().credentials).remove(host):
        click.echo(f"logged out of {host}", err=True)
    else:
        click.echo(f"no stored credentials for {host}", err=True)


commands: list[click.Command] = [registry]
