"""Registry credentials: ember's own file and Docker's ``config.json``.

``ember registry login`` writes ``$EMBER_HOME/credentials.json`` (mode 0600)
in Docker's format (``{"auths": {HOST: {"auth": base64(user:password)}}}``).
Lookups try ember's file first, then ``$DOCKER_CONFIG/config.json`` (default
``~/.docker/config.json``), where a credential helper named for the host
(``credHelpers``) or for all of them (``credsStore``) is asked
(``ember.registry.client.credhelpers``), else ``auths`` is read, whose keys may
be bare hosts or URLs (``https://index.docker.io/v1/`` for Docker Hub).
Anything wrong with Docker's file or its helpers is a warning: ember goes on
without credentials, as a pull that needs no login works.  Ember's own file
that cannot be read is an error saying how to mend it; login and logout move
it aside (``credentials.json.bad``) and start a new one.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember import jsonutil
from ember.fsutil import NotRegularFile, atomic_write, open_regular, why_unopened
from ember.locks import FileLock
from ember.registry.client.errors import CredentialsError, DamagedCredentials

log = logging.getLogger("ember.registry")

#: the key `docker login` keeps Docker Hub's credentials under (in auths and helpers)
DOCKER_HUB_ADDRESS = "https://index.docker.io/v1/"
_DOCKER_HUB_KEYS = (
    DOCKER_HUB_ADDRESS,
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


#: bytes of a credentials file read at most (Docker's holds a few entries)
MAX_FILE_SIZE = 4 << 20


def _read_config(path: Path) -> dict[str, Any]:
    """A credentials file's document ({} if there is none); CredentialsError if it cannot
    be read.  Only a regular file, and only so much of it: a FIFO there hung every pull,
    a link to /dev/zero filled memory."""
    try:
        with open_regular(path) as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        return {}
    except NotRegularFile as e:
        raise DamagedCredentials(f"credentials file {path} {why_unopened(e)}") from None
    except OSError as e:
        # (permissions, a full descriptor table, an I/O error: the file may be intact)
        raise CredentialsError(
            f"credentials file {path} {why_unopened(e)}",
            hint=f"check its owner and mode (ls -l {path})",
        ) from None
    if len(data) > MAX_FILE_SIZE:
        raise DamagedCredentials(
            f"credentials file {path} is larger than {MAX_FILE_SIZE >> 20} MiB: not read"
        )
    try:
        doc = jsonutil.loads(data)
    except ValueError as e:
        raise DamagedCredentials(f"cannot read credentials file {path}: {e}") from None
    return doc if isinstance(doc, dict) else {}


def _move_aside(path: Path) -> Path:
    """Rename ``path`` (a file, a directory, ...) to ``<name>.bad``, or ``.bad.1``, ...
    when taken: an earlier one is a backup too, never replaced.  Called under the lock
    every login and logout takes, so no other ember process picks the same name."""
    for n in range(1000):
        bad = path.with_name(path.name + (".bad" if n == 0 else f".bad.{n}"))
        if not os.path.lexists(bad):
            os.rename(path, bad)
            return bad
    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), f"{path.name}.bad.*")


def _auths_of(doc: dict[str, Any]) -> dict[str, Any]:
    auths = doc.get("auths")
    return auths if isinstance(auths, dict) else {}


def _read_auths(path: Path) -> dict[str, Any]:
    return _auths_of(_read_config(path))


def _entries_for(table: dict[str, Any], host: str) -> list[tuple[str, Any]]:
    """``host``'s entries in a map keyed by registry (``auths``, ``credHelpers``: bare
    hosts or URLs, any case; Docker Hub under any of its names), in lookup order."""
    by_host = {_host_of(k): v for k, v in table.items()}
    return [(key, by_host[key]) for key in _lookup_keys(host) if key in by_host]


def _in_auths(auths: dict[str, Any], host: str, where: str) -> Credentials | None:
    """``host``'s credentials in an ``auths`` map; CredentialsError if its entry cannot
    be read."""
    for _key, entry in _entries_for(auths, host):
        creds = _decode(entry, where)
        if creds is not None:
            return creds
    return None


def _helper_for(doc: dict[str, Any], host: str, where: str) -> str | None:
    """The credential helper Docker's config names for ``host``: its ``credHelpers``
    entry (keys normalised as those of ``auths``), else ``credsStore``."""
    helpers = doc.get("credHelpers")
    for key, name in _entries_for(helpers, host) if isinstance(helpers, dict) else []:
        if not isinstance(name, str):
            raise CredentialsError(f"{where}: credHelpers[{key!r}] is not a string")
        return name or None
    store = doc.get("credsStore")
    if store is not None and not isinstance(store, str):
        raise CredentialsError(f"{where}: credsStore is not a string")
    return store or None


def helper_address(host: str) -> str:
    """The address ``docker login`` keeps ``host``'s credentials under in a helper: the
    host as written (a helper's store may tell case apart), Docker Hub's v1 URL for it."""
    return DOCKER_HUB_ADDRESS if host.lower() in _DOCKER_HUB_KEYS else host


def _lookup_in(source: Path, host: str) -> Credentials | None:
    """``host``'s credentials in one credentials file's ``auths``; CredentialsError if the
    file or the entry cannot be read."""
    return _in_auths(_read_auths(source), host, str(source))


def _lookup_docker(config: Path, host: str) -> Credentials | None:
    """``host``'s credentials by Docker's config.json: those of its credential helper when
    it names one (whatever it answers: as Docker, ``auths`` is then not read: an entry
    left from before the helper is stale), else its ``auths`` entry.  A broken file, or
    a helper that cannot be run or fails, is warned about and ember goes on without
    credentials (the docker CLI fails the pull then; a pull that needs none works)."""
    try:
        doc = _read_config(config)
        helper = _helper_for(doc, host, str(config))
    except CredentialsError as e:
        # as the docker CLI does with a broken config.json: say so, go on without it
        log.warning("%s; going on without it", e)
        return None
    if helper is not None:
        from ember.registry.client.credhelpers import helper_get  # subprocess: only then

        try:
            return helper_get(helper, helper_address(host))
        except CredentialsError as e:
            log.warning("credential helper %r of %s: %s; going on without it", helper, config, e)
            return None
    try:
        return _in_auths(_auths_of(doc), host, str(config))
    except CredentialsError as e:
        log.warning("%s; going on without it", e)
        return None


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


class CredentialStore:
    def __init__(self, path: Path, docker_config: Path | None = None) -> None:
        self.path = path
        self.docker_config = docker_config if docker_config is not None else docker_config_path()

    def lookup(self, host: str) -> Credentials | None:
        # ember's own file first. One that cannot be read is an error, not passed over as
        # Docker's is: credentials stored there would silently go unused. `ember registry
        # login` mends it (``save`` moves an unreadable file aside).
        try:
            creds = _lookup_in(self.path, host)
        except DamagedCredentials as e:
            raise DamagedCredentials(
                e.message,
                hint=f"remove or fix {self.path}, or run ember registry login {host} again",
            ) from None
        return creds if creds is not None else _lookup_docker(self.docker_config, host)

    def save(self, host: str, creds: Credentials) -> None:
        if ":" in creds.username:
            raise CredentialsError("a user name must not contain ':'")
        with self._changing():
            auths = self._auths_to_change()
            auths[host.lower()] = {
                "auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            }
            self._write(auths)

    def remove(self, host: str) -> bool:
        with self._changing():
            auths = self._auths_to_change()
            found = auths.pop(host.lower(), None) is not None
            if found:
                self._write(auths)
        return found

    def _auths_to_change(self) -> dict[str, Any]:
        """The file's entries, for a login or logout to change (under ``_changing``).  A
        file whose content cannot be used (not JSON, not a regular file, too large) is
        moved aside, to a name no earlier one has, with a warning, and the change starts
        afresh: the commands that mend a broken file must not fail on it.  One that could
        not be opened (its permissions) may be intact: that is an error, and it stays."""
        try:
            return _read_auths(self.path)
        except DamagedCredentials as e:
            try:
                bad = _move_aside(self.path)
            except OSError as moving:
                raise CredentialsError(
                    f"{e.message}; cannot move it aside: {moving.strerror}",
                    hint=f"remove or fix {self.path}",
                ) from None
            log.warning("%s; moved it to %s and started a new one", e.message, bad)
            return {}

    def _changing(self) -> FileLock:
        """Held over each read-modify-write of the file: two logins at once each wrote
        back what it read, and one lost the other's entry (a logout could be undone)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return FileLock(self.path.with_name(f".{self.path.name}.lock"))

    def _write(self, auths: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps({"auths": auths}, indent=2).encode() + b"\n", mode=0o600)
