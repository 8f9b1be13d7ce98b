"""Registry credentials: ember's own file and Docker's ``config.json``.

``ember registry login`` writes ``$EMBER_HOME/credentials.json`` (mode 0600)
in Docker's format (``{"auths": {HOST: {"auth": base64(user:password)}}}``).
Lookups try ember's file first, then ``$DOCKER_CONFIG/config.json`` (default
``~/.docker/config.json``), whose ``auths`` keys may be bare hosts or URLs
(``https://index.docker.io/v1/`` for Docker Hub).  Credential helpers
(``credsStore``) are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember import jsonutil
from ember.fsutil import atomic_write
from ember.registry.client.errors import CredentialsError

_DOCKER_HUB_KEYS = (
    "https://index.docker.io/v1/",
    "index.docker.io",
    "docker.io",
    "registry-1.docker.io",
)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print a password
        return f"Credentials(username={self.username!r}, password=***)"


def _host_of(key: str) -> str:
    """``https://host:5000/v1/`` -> ``host:5000``."""
    text = key.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    return text.split("/", 1)[0].lower()


def _lookup_keys(host: str) -> list[str]:
    host = host.lower()
    if host in _DOCKER_HUB_KEYS:
        return list(_DOCKER_HUB_KEYS)
    return [host]


def _decode(entry: Any, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(
                f"{where}: an 'auth' entry is not base64 of user:password"
            ) from None
        if not sep:
            raise CredentialsError(f"{where}: an 'auth' entry is not base64 of user:password")
        return Credentials(user, password)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str):
        return Credentials(name, secret)
    return None


def _read_auths(path: Path) -> dict[str, Any]:
    try:
        doc = jsonutil.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CredentialsError(f"cannot read credentials file {path}: {e}") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    return auths if isinstance(auths, dict) else {}


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


class CredentialStore:
    def __init__(self, path: Path, docker_config: Path | None = None) -> None:
        self.path = path
        self.docker_config = docker_config if docker_config is not None else docker_config_path()

    def lookup(self, host: str) -> Credentials | None:
        for source in (self.path, self.docker_config):
            auths = {_host_of(k): v for k, v in _read_auths(source).items()}
            for key in _lookup_keys(host):
                if key in auths:
                    creds = _decode(auths[key], str(source))
                    if creds is not None:
                        return creds
        return None

    def save(self, host: str, creds: Credentials) -> None:
        if ":" in creds.username:
            raise CredentialsError("a user name must not contain ':'")
        auths = _read_auths(self.path)
        auths[host.lower()] = {
            "auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        }
        self._write(auths)

    def remove(self, host: str) -> bool:
        auths = _read_auths(self.path)
        found = auths.pop(host.lower(), None) is not None
        if found:
            self._write(auths)
        return found

    def _write(self, auths: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps({"auths": auths}, indent=2).encode() + b"\n", mode=0o600)
