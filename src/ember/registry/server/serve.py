"""Running the registry under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import socket
from typing import Any

import uvicorn

from ember.errors import UsageError
from ember.home import Home
from ember.registry.server.app import RegistryApp
from ember.registry.server.config import (
    DB_ENV,
    ServerLimits,
    limits_from_env,
    limits_to_env,
    load_config,
)
from ember.store.db import masked_url


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise UsageError(f"invalid --listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:5000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):  # what getaddrinfo would choke on (IDNA, length)
            raise UsageError(
                f"invalid --listen {text[:300]!r}: {host[:300]!r} is neither an IP address nor a host name"
            ) from None
    return host, int(port)


_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _check_bindable(family: socket.AddressFamily, address: tuple[Any, ...], listen: str) -> None:
    """Say why the address cannot be listened on, as one line, before the
    server starts (uvicorn would log it after announcing that it serves)."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as e:
        raise UsageError(f"cannot listen on {listen[:300]}: {e.strerror or e}") from None


def app_from_env() -> RegistryApp:
    """Factory for worker processes: state dir and database come from the environment.

    A worker ends with its supervisor (SIGTERM when it dies): one whose `ember server`
    was SIGKILLed (the OOM killer, kill -9) went on serving, unsupervised, and held
    the port against the restart."""
    import signal

    from ember.process import parent_death_signal

    parent_death_signal(signal.SIGTERM)
    if os.getppid() == 1:  # it died before we asked
        raise SystemExit(0)
    _configure_logging()  # a spawned worker starts without the supervisor's
    return RegistryApp(load_config(Home.from_env(), os.environ.get(DB_ENV), limits_from_env()))


def _describe_limits(limits: ServerLimits) -> str:
    def most(n: int) -> str:
        return "any number of" if n == 0 else f"at most {n}"

    purge = (
        f"every {limits.upload_purge_interval:g} s"
        if limits.upload_purge_interval
        else "never (only by `ember admin registry gc`)"
    )
    return (
        f"per organization: {most(limits.max_uploads)} unfinished upload sessions opened in an hour, "
        f"{most(limits.max_repositories)} repositories; expired upload sessions and empty "
        f"repositories purged {purge}"
    )


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def serve(
    home: Home,
    listen: str,
    db_url: str | None = None,
    workers: int = 1,
    limits: ServerLimits | None = None,
) -> None:
    host, port = parse_listen(listen)
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as e:
        raise UsageError(f"invalid --listen {listen!r}: cannot resolve {host} ({e})") from None
    _check_bindable(family, address, listen)
    # Load once in the parent: creates the secret and runs migrations before any worker starts.
    config = load_config(home, db_url, limits)
    app = RegistryApp(config)
    _configure_logging()
    log = logging.getLogger("ember.registry")
    log.info(
        "serving the registry on http://%s:%d with %d worker(s); state %s, database %s",
        f"[{host}]" if ":" in host else host,
        port,
        workers,
        config.root,
        masked_url(config.db_url),
    )
    log.info("%s", _describe_limits(config.limits))
    common = {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "log_level": "warning",
        "timeout_keep_alive": 30,
    }
    # A hang-up (the terminal closed, the agent's client gone) stops the server as SIGTERM
    # does, gracefully: the CLI's handler raised inside uvicorn's loop, which printed
    # two tracebacks and exited 0.
    # (Not under nohup.  With workers, uvicorn's supervisor takes SIGHUP: it restarts them.)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda _signum, _frame: os.kill(os.getpid(), signal.SIGTERM))
    if workers <= 1:
        uvicorn.run(app, lifespan="on", **common)  # type: ignore[arg-type]
        return
    os.environ["EMBER_HOME"] = str(home.root)
    os.environ[DB_ENV] = config.db_url
    os.environ.update(limits_to_env(config.limits))
    uvicorn.run(
        "ember.registry.server.serve:app_from_env",
        factory=True,
        workers=workers,
        **common,  # type: ignore[arg-type]
    )
