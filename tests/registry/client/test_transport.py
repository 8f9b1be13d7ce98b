"""The client's HTTP transport against real HTTP servers on loopback."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ember.registry.client.errors import ProxyConfigError
from ember.registry.client.transport import (
    ConnectionPool,
    Origin,
    TransportError,
    proxy_for,
    split_url,
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    seen: list[tuple[str, str, dict[str, str], int]]  # method, target, headers, client port


Handler = Callable[[BaseHTTPRequestHandler], None]


@contextmanager
def serve(
    answer: Handler, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> Iterator[_Server]:
    """An HTTP/1.1 server on ``host`` (HTTPS with ``tls``, a server-side context)."""
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            server = self.server
            assert isinstance(server, _Server)
            server.seen.append(
                (self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                 self.client_address[1])
            )  # fmt: skip
            answer(self)

        def log_message(self, *args: object) -> None:
            pass

    server = _Server((host, 0), H)
    server.seen = []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    # a short poll: shutdown() waits for it (0.5 s by default)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def url(server: _Server, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def ok(body: bytes = b"hello") -> Handler:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return answer


@pytest.fixture()
def pool() -> Iterator[ConnectionPool]:
    p = ConnectionPool(
        ssl_context=ssl.create_default_context(), timeout=10, connect_timeout=5, max_idle=4,
        user_agent="ember-test",
    )  # fmt: skip
    yield p
    p.close()


def get(pool: ConnectionPool, target: str, headers: dict[str, str] | None = None) -> bytes:
    resp = pool.send("GET", target, headers or {})
    try:
        return resp.read()
    finally:
        resp.close()


def test_a_connection_is_kept_alive_and_reused(pool: ConnectionPool) -> None:
    with serve(ok()) as server:
        assert get(pool, url(server, "/a")) == b"hello"
        assert get(pool, url(server, "/b")) == b"hello"
    ports = {port for *_, port in server.seen}
    assert len(ports) == 1
    assert [s[2]["user-agent"] for s in server.seen] == ["ember-test"] * 2
    assert server.seen[0][2]["host"] == f"127.0.0.1:{server.server_address[1]}"


def test_a_response_closed_early_does_not_poison_the_next_request(pool: ConnectionPool) -> None:
    with serve(ok(b"x" * 300_000)) as server:
        resp = pool.send("GET", url(server), {})
        next(resp.iter_bytes())  # part of the body only
        resp.close()
        assert get(pool, url(server)) == b"x" * 300_000


def test_an_idle_connection_the_server_closed_is_replaced(pool: ConnectionPool) -> None:
    def answer_then_hang_up(h: BaseHTTPRequestHandler) -> None:
        ok()(h)
        h.close_connection = True  # without saying so: the client's idle connection dies

    with serve(answer_then_hang_up) as server:
        assert get(pool, url(server)) == b"hello"
        assert get(pool, url(server)) == b"hello"
    assert len({port for *_, port in server.seen}) == 2


def test_a_body_cut_short_is_a_transport_error(pool: ConnectionPool) -> None:
    def short(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"x" * 10)
        h.wfile.flush()
        h.close_connection = True

    with serve(short) as server, pytest.raises(TransportError, match="990 bytes"):
        get(pool, url(server))


def test_a_refused_connection_is_a_transport_error(pool: ConnectionPool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens on it
    with pytest.raises(TransportError, match="ConnectionRefused") as err:
        get(pool, f"http://127.0.0.1:{port}/")
    assert not err.value.tls


def test_redirects_keep_authorization_only_within_the_origin(pool: ConnectionPool) -> None:
    with serve(ok(b"blob")) as other:
        elsewhere = url(other, "/data")

        def redirect(h: BaseHTTPRequestHandler) -> None:
            h.send_response(307)
            h.send_header("Location", "/moved" if h.path == "/start" else elsewhere)
            h.send_header("Content-Length", "0")
            h.end_headers()

        with serve(redirect) as first:
            assert get(pool, url(first, "/start"), {"Authorization": "Bearer t", "Range": "bytes=1-"}) == b"blob"
    assert [(s[1], s[2].get("authorization")) for s in first.seen] == [
        ("/start", "Bearer t"),
        ("/moved", "Bearer t"),
    ]
    ((_, path, headers, _),) = other.seen
    assert path == "/data" and "authorization" not in headers and headers["range"] == "bytes=1-"


def test_endless_redirects_stop(pool: ConnectionPool) -> None:
    def loop(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", h.path)
        h.send_header("Content-Length", "0")
        h.end_headers()

    with serve(loop) as server, pytest.raises(TransportError, match="redirects"):
        get(pool, url(server))


def test_a_plain_http_proxy_gets_the_absolute_url(
    pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(ok(b"via proxy")) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://user:pa%3Ass@127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        # never resolved nor contacted: the proxy answers for it
        assert get(pool, "http://registry.invalid:5000/v2/") == b"via proxy"
    ((_, target, headers, _),) = proxy.seen
    assert target == "http://registry.invalid:5000/v2/"
    assert headers["host"] == "registry.invalid:5000"
    assert headers["proxy-authorization"] == "Basic dXNlcjpwYTpzcw=="  # user:pa:ss


def test_proxy_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    reg = Origin("https", "registry.example.com", 443)
    assert proxy_for(reg) == (None, None)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    assert proxy_for(reg) == (Origin("http", "proxy.corp", 3128), None)
    # loopback never goes through a proxy (as with Docker)
    for host in ("localhost", "127.0.0.1", "::1", "reg.localhost"):
        assert proxy_for(Origin("https", host, 5000)) == (None, None)
    # the plain-HTTP variable is not used for HTTPS, ALL_PROXY is a fallback
    assert proxy_for(Origin("http", "registry.example.com", 80)) == (None, None)
    monkeypatch.setenv("ALL_PROXY", "http://all:8080")
    assert proxy_for(Origin("http", "registry.example.com", 80))[0] == Origin("http", "all", 8080)
    for no_proxy, bypassed in [
        ("example.com", True),
        (".example.com", True),
        ("*.example.com", True),
        ("other.com,registry.example.com", True),
        ("registry.example.com:443", True),
        ("registry.example.com:5000", False),
        ("ample.com", False),
        ("*", True),
    ]:
        monkeypatch.setenv("NO_PROXY", no_proxy)
        assert (proxy_for(reg) == (None, None)) == bypassed, no_proxy
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", "socks5://proxy:1080")
    with pytest.raises(ProxyConfigError, match="unsupported proxy"):
        proxy_for(reg)


def test_split_url() -> None:
    assert split_url("https://r.example/v2/a?x=1") == (Origin("https", "r.example", 443), "/v2/a?x=1")
    assert split_url("http://[::1]:5000") == (Origin("http", "::1", 5000), "/")
    assert Origin("http", "::1", 5000).netloc == "[::1]:5000"
    assert Origin("https", "r.example", 443).netloc == "r.example"
    for bad in ("ftp://x/", "http:///path", "http://host:99999/", "realm"):
        with pytest.raises(ValueError):
            split_url(bad)


def test_the_tls_context_is_made_only_when_https_needs_it() -> None:
    made: list[ssl.SSLContext] = []

    def factory() -> ssl.SSLContext:
        made.append(ssl.create_default_context())
        return made[-1]

    pool = ConnectionPool(ssl_context=factory, timeout=10, connect_timeout=5, max_idle=4, user_agent="t")
    try:
        with serve(ok()) as server:
            assert get(pool, url(server)) == b"hello"
        assert made == []
        assert pool.ssl_context() is pool.ssl_context()
        assert len(made) == 1
    finally:
        pool.close()


def test_split_url_refuses_ports_out_of_range() -> None:
    for port in ("0", "65536", "99999"):
        with pytest.raises(ValueError, match="port"):
            split_url(f"http://host:{port}/v2/")
    assert split_url("http://host:65535/")[0].port == 65535


def _no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


def test_a_proxy_with_a_bad_port_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_proxy_settings(monkeypatch)
    for port in ("0", "70000"):
        monkeypatch.setenv("HTTPS_PROXY", f"http://alice:s3cret@proxy.corp:{port}")
        with pytest.raises(ProxyConfigError, match="port") as e:
            proxy_for(Origin("https", "registry.example.com", 443))
        assert f"invalid proxy 'http://proxy.corp:{port}' in HTTPS_PROXY" in str(e.value)
        assert "s3cret" not in str(e.value) and "alice" not in str(e.value)


@pytest.mark.parametrize("setting", ["http://[::1", "http://u:s3cret@[zz]:80", "http://[::1]x:80"])
def test_a_proxy_url_that_does_not_parse_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """urlsplit's ValueError ("Invalid IPv6 URL") went up to the user as a traceback."""
    _no_proxy_settings(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", setting)
    with pytest.raises(ProxyConfigError, match="invalid proxy .* in HTTPS_PROXY") as e:
        proxy_for(Origin("https", "registry.example.com", 443))
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        ("socks5://alice:s3cret@proxy.corp:1080", "'socks5://proxy.corp:1080'"),
        # a "/" in the password: urlsplit takes the rest for the path
        ("socks5://alice:s3/cret@proxy.corp:1080/x?token=s3cret", "'socks5://proxy.corp:1080'"),
        ("https://alice:s3cret@proxy.corp", "'https://proxy.corp'"),
    ],
)
def test_an_unsupported_proxy_is_one_error_without_its_password_and_not_retried(
    monkeypatch: pytest.MonkeyPatch, setting: str, shown: str
) -> None:
    """The proxy URL was printed whole (user and password), as a TransportError: retried
    five times, then reported as "cannot reach registry"."""
    import ember.registry.client.client as client_module
    from ember.registry.client.client import RegistryClient

    _no_proxy_settings(monkeypatch)
    monkeypatch.setenv("https_proxy", setting)
    pauses: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", pauses.append)
    with (
        RegistryClient("registry.example.com") as client,  # refused before any connection
        pytest.raises(ProxyConfigError) as e,
    ):
        client.get_manifest("app", "latest")
    message = str(e.value)
    assert f"unsupported proxy {shown} in https_proxy" in message
    assert "s3" not in message and "alice" not in message and "cannot reach" not in message
    assert e.value.hint is not None and "http:// proxy" in e.value.hint
    assert pauses == []  # not retried
