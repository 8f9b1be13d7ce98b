"""HTTP/1.1 for the registry client, on the standard library's ``http.client``.

What a pull needs and nothing more: GET with streamed bodies, keep-alive
connections shared by the download threads, redirects (``Authorization`` is
dropped when one leaves the origin), separate connect and read timeouts, TLS
with the caller's context, and the proxy variables (``HTTPS_PROXY``,
``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) as Go's ``net/http`` reads them,
so as Docker does: loopback hosts never go through a proxy.

Why not httpx (which the client used before): importing httpx and httpcore
costs ~60 ms, the whole budget of pulling a small image, and each request
through it costs several times what ``http.client`` does.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from ember.registry.client.errors import ProxyConfigError, RegistryProtocolError

#: bytes asked of the socket per read of a body
READ_SIZE = 64 * 1024
MAX_REDIRECTS = 10
#: a body that brings fewer bytes than this in a whole read timeout is cut like a dropped
#: connection (and a blob resumed): a peer that sends a byte now and then never trips
#: the timeout itself (a read waits for one byte, not for a rate), and would hold a
#: pull for ever (curl's --speed-limit idea, at ~17 bytes/s for 60 s)
MIN_BYTES_PER_TIMEOUT = 1024
_REDIRECTS = (301, 302, 303, 307, 308)


class TransportError(Exception):
    """The connection failed (refused, reset, timed out, cut mid-body, TLS): worth a retry,
    except for TLS failures (``tls``); a peer that stays silent (``timed_out``) is worth
    one retry, not many, as each try waits the whole timeout."""

    def __init__(self, message: str, *, tls: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.tls = tls
        self.timed_out = timed_out


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str  # as in the URL: a name, an IPv4 address or an IPv6 address without brackets
    port: int

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def split_url(url: str) -> tuple[Origin, str]:
    """``(origin, request target)`` of an absolute http(s) URL; ValueError if it is not one."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url[:200]!r}")
    port = _port(parts, 443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(scheme, parts.hostname, port), target


def _port(parts: SplitResult, default: int) -> int:
    """The URL's port, or ``default`` when it names none; ValueError unless it is 1-65535
    (port 0 must not quietly become the default)."""
    try:
        port = parts.port  # ValueError when not a number or above 65535
    except ValueError:
        port = 0
    if port is None:
        return default
    if port == 0:
        # only the port: a proxy's netloc may hold a password
        raw = parts.netloc.rpartition(":")[2][:20]
        raise ValueError(f"invalid port {raw!r}: a port is a number from 1 to 65535")
    return port


class Headers:
    """Response headers, looked up without regard to case; repeated ones joined by ", "."""

    def __init__(self, message: http.client.HTTPMessage) -> None:
        self._message = message

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._message.get_all(name)
        return ", ".join(values) if values else default


class _Pace:
    """Tells a body that trickles: fewer than ``minimum`` bytes in ``window`` seconds."""

    def __init__(self, window: float, minimum: int = MIN_BYTES_PER_TIMEOUT) -> None:
        self.window = window
        self.minimum = minimum
        self._since = time.monotonic()
        self._bytes = 0

    def add(self, n: int) -> None:
        """Count ``n`` bytes just received; TransportError once a window brought too few."""
        self._bytes += n
        elapsed = time.monotonic() - self._since
        if elapsed < self.window:
            return
        if self._bytes < self.minimum:
            raise TransportError(f"only {self._bytes} bytes came in {elapsed:.0f} s")
        self._since, self._bytes = time.monotonic(), 0


#: (origin, proxy origin or None, proxy authorization or None)
_Key = tuple[Origin, Origin | None, str | None]


class Response:
    """A response whose body is read as it arrives; ``close`` hands the connection back."""

    def __init__(
        self, pool: ConnectionPool, key: _Key, conn: http.client.HTTPConnection,
        raw: http.client.HTTPResponse,
    ) -> None:  # fmt: skip
        self._pool, self._key, self._conn, self._raw = pool, key, conn, raw
        self.status_code = raw.status
        self.headers = Headers(raw.msg)
        #: who answered: the origin of the request's last redirect, if it was redirected
        self.origin: Origin = key[0]
        self._done = False  # the body was read to its end
        self._closed = False

    def iter_bytes(self) -> Iterator[bytes]:
        """The body in chunks as received; TransportError if the connection is cut before its end."""
        raw = self._raw
        pace = _Pace(self._pool.timeout)
        while not self._closed:
            try:
                chunk = raw.read1(READ_SIZE)
            except (OSError, http.client.HTTPException) as e:
                raise _transport_error(e, "reading the body") from None
            if not chunk:
                if raw.length:  # http.client ends a short Content-Length body silently
                    raise TransportError(f"connection closed with {raw.length} bytes of the body missing")
                self._done = True
                return
            yield chunk
            pace.add(len(chunk))

    def read(self) -> bytes:
        return b"".join(self.iter_bytes())

    def abort(self) -> None:
        """Wake a read of the body blocked in another thread: shut the socket down (the
        reader sees the connection end, and the connection is not reused).
        ``socket.socket.shutdown`` on the descriptor itself, for a TLS socket too:
        ``SSLSocket.shutdown`` would also drop the TLS object under the reader's feet."""
        sock = self._conn.sock
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._done and self._raw.length == 0:
            self._done = True  # an empty body, never iterated
        reusable = self._done and not self._raw.will_close
        self._raw.close()
        self._pool.release(self._key, self._conn, reusable)


class ConnectionPool:
    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        timeout: float,
        connect_timeout: float,
        max_idle: int,
        user_agent: str,
        plain_http_ok: Callable[[str], bool] | None = None,
    ) -> None:
        #: whether a redirect from HTTPS may lead to this host in plain HTTP (none may
        #: without it): what the caller trusts in plain HTTP (loopback, --plain-http)
        self._plain_http_ok = plain_http_ok or (lambda _host: False)
        #: a context, or what makes one when the first HTTPS connection needs it
        self._ssl: ssl.SSLContext | Callable[[], ssl.SSLContext] = ssl_context
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.user_agent = user_agent
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._closed = False
        #: origins whose certificates are not checked (``accept_any_certificate``)
        self._unverified: set[Origin] = set()

    # -- connections -------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        with self._lock:
            if not isinstance(self._ssl, ssl.SSLContext):
                self._ssl = self._ssl()
            return self._ssl

    def accept_any_certificate(self, origin: Origin) -> None:
        """Connect to ``origin`` (and only there: not where it redirects) without
        checking its certificate: what Docker does for an insecure registry."""
        with self._lock:
            self._unverified.add(origin)

    def _context_for(self, origin: Origin) -> ssl.SSLContext:
        if origin in self._unverified:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        return self.ssl_context()

    def _connect(self, key: _Key) -> http.client.HTTPConnection:
        origin, proxy, proxy_auth = key
        conn: http.client.HTTPConnection
        via = proxy or origin
        if origin.scheme == "https":
            conn = http.client.HTTPSConnection(
                via.host, via.port, timeout=self.connect_timeout, context=self._context_for(origin)
            )
            if proxy is not None:
                headers = {"Proxy-Authorization": proxy_auth} if proxy_auth else None
                conn.set_tunnel(origin.host, origin.port, headers=headers)
        else:
            conn = http.client.HTTPConnection(via.host, via.port, timeout=self.connect_timeout)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise _transport_error(e, f"connecting to {via.netloc}") from None
        if conn.sock is not None:
            conn.sock.settimeout(self.timeout)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _take(self, key: _Key) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def release(self, key: _Key, conn: http.client.HTTPConnection, reusable: bool) -> None:
        if reusable:
            with self._lock:
                idle = self._idle.setdefault(key, [])
                if not self._closed and len(idle) < self.max_idle:
                    idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()

    # -- requests ----------------------------------------------------------------------------

    def _once(self, method: str, url: str, headers: dict[str, str]) -> Response:
        origin, target = split_url(url)
        proxy, proxy_auth = proxy_for(origin)
        key: _Key = (origin, proxy, proxy_auth)
        if proxy is not None and origin.scheme == "http":
            target = url  # a plain-HTTP proxy takes the absolute URL
            if proxy_auth:
                headers = {**headers, "Proxy-Authorization": proxy_auth}
        while True:
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = self._connect(key)
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", origin.netloc)
                conn.putheader("User-Agent", self.user_agent)
                for name, value in headers.items():
                    conn.putheader(name, value)
                conn.endheaders()
                raw = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                if reused and not isinstance(e, (TimeoutError, ssl.SSLError)):
                    continue  # the server closed the idle connection: once more on a new one
                raise _transport_error(e, f"{method} {origin.netloc}") from None
            except UnicodeError as e:  # a target or header value that is not ASCII/latin-1
                conn.close()
                raise TransportError(f"{method} {origin.netloc}: cannot be sent ({e})") from None
            return Response(self, key, conn, raw)

    def send(self, method: str, url: str, headers: dict[str, str]) -> Response:
        """One request, following redirects; the caller closes the response."""
        origin = split_url(url)[0]
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._once(method, url, headers)
            location = resp.headers.get("Location")
            if resp.status_code not in _REDIRECTS or not location:
                return resp
            resp.close()
            url = urljoin(url, location)
            try:
                if not url.isascii():  # (http.client cannot send it)
                    raise ValueError(url)
                new_origin = split_url(url)[0]
            except ValueError:
                raise TransportError(f"redirected to an unusable URL {url[:200]!r}") from None
            if origin.scheme == "https" and new_origin.scheme == "http":
                self._check_downgrade(origin, new_origin)
            if new_origin != origin:
                # credentials for one origin never go to another (S3 and CDN redirects)
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                origin = new_origin
            if resp.status_code == 303:
                method = "GET"
        raise TransportError(f"more than {MAX_REDIRECTS} redirects")


    def _check_downgrade(self, origin: Origin, target: Origin) -> None:
        """A redirect from HTTPS to plain HTTP: refused (not retried: the server will say
        the same) unless the caller trusts the target host in plain HTTP, as the bytes
        and the request (a token in its URL) would otherwise travel unprotected."""
        if self._plain_http_ok(target.host):
            return
        raise RegistryProtocolError(
            f"{origin.netloc} redirected an HTTPS request to plain HTTP ({target.netloc}): "
            "refused, it would travel unprotected",
            hint="ember follows such a redirect only to a loopback host or to a registry "
            "given --plain-http",
        )


def _transport_error(e: BaseException, what: str) -> TransportError:
    detail = str(e) or type(e).__name__
    return TransportError(
        f"{what}: {type(e).__name__}: {detail}",
        tls=isinstance(e, ssl.SSLError),
        timed_out=isinstance(e, TimeoutError),
    )


# -- proxies (Go's net/http/httpproxy rules) -------------------------------------------------


def _env(name: str) -> tuple[str, str]:
    """(the variable's name as set, its value): the upper-case one first, as Go reads them."""
    for var in (name.upper(), name.lower()):
        if value := os.environ.get(var):
            return var, value
    return name.upper(), ""


def _bypassed(origin: Origin, no_proxy: str) -> bool:
    host = origin.host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    for item in (x.strip().lower() for x in no_proxy.split(",")):
        if not item:
            continue
        if item == "*":
            return True
        name, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        if port and port != str(origin.port):
            continue
        name = name.strip("[]").lstrip("*")
        if host == name.lstrip(".") or (name.startswith(".") and host.endswith(name)):
            return True
        if not name.startswith(".") and host.endswith("." + name):
            return True
    return False


def proxy_for(origin: Origin) -> tuple[Origin | None, str | None]:
    """The proxy (and its Proxy-Authorization) for ``origin``, from the environment;
    ProxyConfigError for a setting that cannot be used (not retried: it will not change)."""
    var, value = _env("https_proxy" if origin.scheme == "https" else "http_proxy")
    if not value:
        var, value = _env("all_proxy")
    if not value or _bypassed(origin, _env("no_proxy")[1]):
        return None, None
    if "://" not in value:
        value = "http://" + value
    try:
        parts = urlsplit(value)
        hostname = parts.hostname  # (parsed here: a bad [IPv6] host raises only now)
    except ValueError as e:
        raise ProxyConfigError(
            f"invalid proxy {_shown(value)} in {var}: {e}",
            hint=f"set {var} to http://HOST:PORT, or unset it",
        ) from None
    if parts.scheme.lower() != "http" or not hostname:
        raise ProxyConfigError(
            f"unsupported proxy {_shown(value)} in {var}: ember speaks to http:// proxies only",
            hint=f"set {var} to an http:// proxy (http://HOST:PORT), or unset it",
        )
    try:
        port = _port(parts, 80)
    except ValueError as e:
        raise ProxyConfigError(
            f"invalid proxy {_shown(value)} in {var}: {e}",
            hint=f"set {var} to http://HOST:PORT with a port from 1 to 65535",
        ) from None
    auth = None
    if parts.username is not None:
        raw = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        auth = "Basic " + base64.b64encode(raw).decode()
    return Origin("http", hostname, port), auth


def _shown(value: str) -> str:
    """A proxy URL as it may be printed: scheme://host:port, never its user and password
    (cut at the last "@": a password may hold a "/" that urlsplit takes for the path's
    start), nor a path or query, which may hold a token."""
    scheme, _, rest = value.partition("://")
    where = rest.rpartition("@")[2]
    for end in "/?#":
        where = where.split(end, 1)[0]
    text = f"{scheme}://{where}"[:200]
    return repr("".join(c if c.isprintable() else "?" for c in text))
