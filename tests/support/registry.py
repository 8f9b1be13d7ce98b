"""Run Debian's ``docker-registry`` (CNCF Distribution 2.8) on a loopback port.

Used by the ``registry`` / ``auth_registry`` pytest fixtures and by the bench
scripts.  Each instance has its own storage directory and config file, so
tests never share state with the host or with each other.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.spawn import spawn_server

REGISTRY_BIN = "/usr/bin/docker-registry"
HTPASSWD_BIN = "htpasswd"
START_TIMEOUT = 30.0


class RegistryStartError(RuntimeError):
    """docker-registry did not come up; the message carries its log tail."""


@dataclass
class Registry:
    """A running docker-registry.  ``host`` is ``127.0.0.1:PORT``."""

    host: str
    root: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    username: str | None = None
    password: str | None = None
    #: serves HTTPS with this certificate (PEM) instead of plain HTTP
    certificate: Path | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.certificate else 'http'}://{self.host}"

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def log_path(self) -> Path:
        return self.root / "registry.log"

    @property
    def creds(self) -> str | None:
        """``user:password`` as skopeo's ``--creds`` wants it, or None."""
        if self.username is None:
            return None
        return f"{self.username}:{self.password}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    """A port free right now on 127.0.0.1 (the caller retries if it is taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def htpasswd_line(username: str, password: str) -> str:
    """A bcrypt htpasswd entry, made by apache2-utils' ``htpasswd -Bbn``."""
    out = subprocess.run(
        [HTPASSWD_BIN, "-Bbn", username, password],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip() + "\n"


def self_signed_certificate(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """(certificate, key) made by ``openssl req``, for ``name`` and 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _config(addr: str, storage: Path, htpasswd: Path | None, tls: tuple[Path, Path] | None = None) -> str:
    # YAML written by hand: the structure is fixed and tiny.  Deletes are
    # enabled so tests can exercise DELETE; no redirects, no caching layer.
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: {addr}",
        "  secret: ember-test-secret",
    ]
    if tls is not None:
        lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if htpasswd is not None:
        lines += [
            "auth:",
            "  htpasswd:",
            "    realm: ember-test",
            f"    path: {htpasswd}",
        ]
    return "\n".join(lines) + "\n"


def _log_tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait_ready(reg: Registry, timeout: float) -> None:
    """Poll ``/v2/`` until it answers 200 (open) or 401 (auth) or the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reg.process.poll() is not None:
            raise RegistryStartError(
                f"docker-registry exited with {reg.process.returncode}:\n{_log_tail(reg.log_path)}"
            )
        # the test's own self-signed certificate: nothing to verify it against
        context = ssl._create_unverified_context() if reg.certificate else None
        try:
            with urllib.request.urlopen(f"{reg.url}/v2/", timeout=2, context=context) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 401 and reg.username is not None:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    reg.stop()
    raise RegistryStartError(
        f"docker-registry did not answer /v2/ within {timeout}s:\n{_log_tail(reg.log_path)}"
    )


def start_registry(
    root: Path,
    *,
    username: str | None = None,
    password: str | None = None,
    attempts: int = 5,
    tls: bool = False,
) -> Registry:
    """Start a registry whose config, storage and log live under ``root``.

    With ``username``/``password`` it requires HTTP basic auth (htpasswd); with
    ``tls`` it serves HTTPS with a self-signed certificate (``Registry.certificate``).
    Retries on a new port when the chosen one was grabbed in between.
    """
    if not os.access(REGISTRY_BIN, os.X_OK):
        raise RegistryStartError(f"{REGISTRY_BIN} missing: apt-get install docker-registry")
    root.mkdir(parents=True, exist_ok=True)
    storage = root / "storage"
    storage.mkdir(exist_ok=True)
    htpasswd: Path | None = None
    if username is not None:
        if password is None:
            raise ValueError("password required with username")
        htpasswd = root / "htpasswd"
        htpasswd.write_text(htpasswd_line(username, password))
    pem = self_signed_certificate(root / "tls") if tls else None
    last: RegistryStartError | None = None
    for _ in range(attempts):
        host = f"127.0.0.1:{free_port()}"
        config = root / "config.yml"
        config.write_text(_config(host, storage, htpasswd, pem))
        proc = spawn_server([REGISTRY_BIN, "serve", str(config)], root / "registry.log")
        reg = Registry(host, root, proc, username, password, pem[0] if pem else None)
        try:
            _wait_ready(reg, START_TIMEOUT)
            return reg
        except RegistryStartError as e:
            reg.stop()
            last = e
    assert last is not None
    raise last


@contextlib.contextmanager
def running_registry(
    root: Path,
    *,
    username: str | None = None,
    password: str | None = None,
    keep: bool = False,
    tls: bool = False,
) -> Iterator[Registry]:
    """``start_registry`` as a context manager; removes ``root`` unless ``keep``."""
    reg = start_registry(root, username=username, password=password, tls=tls)
    try:
        yield reg
    finally:
        reg.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
