"""Server configuration: where state lives and the signing secret.

The secret signs registry tokens and upload-state URLs.  It comes from
``EMBER_REGISTRY_SECRET`` (hex or any string of at least 32 characters), else
from ``registry_secret`` in ``$EMBER_HOME/config.json``; if neither exists the
first start generates one and stores it there with mode 0600.  Replicas that
share it accept each other's tokens and upload URLs.  Tokens and upload state
use different keys derived from it, so one can never be replayed as the other.

Limits (``ServerLimits``) come from ``ember server``'s options, each of which may
also be given as an environment variable; workers of ``--workers N`` read them
from that environment (``limits_from_env``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, fields
from pathlib import Path

from ember.config import read_config
from ember.fsutil import atomic_write
from ember.home import Home
from ember.locks import FileLock
from ember.registry.server.errors import RegistryError

SECRET_ENV = "EMBER_REGISTRY_SECRET"
DB_ENV = "EMBER_REGISTRY_DB"
_CONFIG_KEY = "registry_secret"
MIN_SECRET = 32


@dataclass(frozen=True)
class ServerLimits:
    """What one organization may have at once, and how the server keeps itself clean."""

    #: unfinished upload sessions an organization may have opened within the last hour
    #: (UPLOAD_CAP_WINDOW); 0: no limit
    max_uploads: int = 1000
    #: repositories per organization; 0: no limit
    max_repositories: int = 10000
    #: seconds between two purges of expired upload sessions (and of repositories left
    #: with nothing) by the server itself; 0: never (``ember admin registry gc`` does)
    upload_purge_interval: float = 3600.0


#: the environment variable of each limit (also what ``ember server``'s options read)
LIMIT_ENV = {
    "max_uploads": "EMBER_REGISTRY_MAX_UPLOADS",
    "max_repositories": "EMBER_REGISTRY_MAX_REPOSITORIES",
    "upload_purge_interval": "EMBER_REGISTRY_UPLOAD_PURGE_INTERVAL",
}


def limits_from_env() -> ServerLimits:
    """The limits the environment sets (defaults for the others)."""
    defaults = ServerLimits()
    values: dict[str, int | float] = {}
    for f in fields(ServerLimits):
        text = os.environ.get(LIMIT_ENV[f.name])
        if text is None or not text.strip():
            continue
        kind = type(getattr(defaults, f.name))  # int or float, as the default is
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if value < 0:
            raise RegistryError(
                f"{LIMIT_ENV[f.name]}={text[:40]!r} is not valid: "
                f"expected a {'whole ' if kind is int else ''}number, 0 or more"
            )
        values[f.name] = value
    return ServerLimits(**values)  # type: ignore[arg-type]


def limits_to_env(limits: ServerLimits) -> dict[str, str]:
    """The environment that gives worker processes ``limits``."""
    return {LIMIT_ENV[f.name]: str(getattr(limits, f.name)) for f in fields(ServerLimits)}


@dataclass(frozen=True)
class ServerConfig:
    home: Home
    db_url: str
    secret: bytes
    limits: ServerLimits = ServerLimits()

    @property
    def root(self) -> Path:
        return registry_root(self.home)

    @property
    def token_key(self) -> bytes:
        return hmac.new(self.secret, b"ember registry token", hashlib.sha256).digest()

    @property
    def upload_key(self) -> bytes:
        return hmac.new(self.secret, b"ember upload state", hashlib.sha256).digest()


def registry_root(home: Home) -> Path:
    """The registry's own state: its content store and in-flight uploads.

    Kept apart from the host's image content store so that registry GC can never
    delete a blob a local image still needs.
    """
    return home.registry


def load_secret(home: Home) -> bytes:
    env = os.environ.get(SECRET_ENV)
    if env is not None:
        if len(env) < MIN_SECRET:
            raise RegistryError(f"{SECRET_ENV} must be at least {MIN_SECRET} characters")
        return env.encode()
    home.ensure()
    with FileLock(home.config_lock):  # two first starts at once must agree on one secret
        config = read_config(home, RegistryError)
        value = config.get(_CONFIG_KEY)
        if value is not None:
            # one a person set (shared by replicas): never replaced behind their back,
            # which made the replicas refuse each other's tokens
            if not isinstance(value, str) or len(value) < MIN_SECRET:
                raise RegistryError(
                    f"{home.config_file}: {_CONFIG_KEY} must be a string of at least "
                    f"{MIN_SECRET} characters",
                    hint="remove it to have one made, or set a longer one (the same on every replica)",
                )
            return value.encode()
        config[_CONFIG_KEY] = secrets.token_hex(32)
        atomic_write(home.config_file, json.dumps(config, indent=2).encode() + b"\n", mode=0o600)
        return str(config[_CONFIG_KEY]).encode()


def database_url(home: Home, db_url: str | None = None) -> str:
    """The registry database: ``--db``, else ``$EMBER_REGISTRY_DB``, else SQLite in the home.

    ``postgresql://`` and ``postgres://`` mean psycopg 3 (the driver ember installs);
    SQLAlchemy would otherwise look for psycopg2.
    """
    url = db_url or os.environ.get(DB_ENV) or home.db_url
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def load_config(
    home: Home, db_url: str | None = None, limits: ServerLimits | None = None
) -> ServerConfig:
    return ServerConfig(
        home=home,
        db_url=database_url(home, db_url),
        secret=load_secret(home),
        limits=limits or ServerLimits(),
    )
