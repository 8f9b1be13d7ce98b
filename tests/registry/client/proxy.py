"""A real HTTP server in front of a real registry that misbehaves on purpose.

Tests point ember's client at it to see what happens when connections are cut
mid-blob, when ``Range`` is ignored, when bytes are corrupted, when the
registry answers 503, and when a token service guards the API (Bearer flow
from the distribution token spec).  Requests are forwarded to the upstream
docker-registry; nothing of the client is replaced.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_BLOB = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")
_REPO = re.compile(r"^/v2/(.+)/(?:blobs|manifests)/")


@dataclass
class Behaviour:
    #: cut the connection after this many body bytes on the first GET of each blob bigger than it
    cut_blob_after: int | None = None
    #: on the first GET of each blob bigger than this, send this many bytes then stall
    #: until the proxy stops (for killing a client mid-download)
    stall_blob_after: int | None = None
    #: forward without the Range header (the server answers 200 with the whole blob)
    ignore_range: bool = False
    #: flip one byte in every blob body
    corrupt_blobs: bool = False
    #: flip one byte in the bodies of these blobs (digests) only
    corrupt_only: set[str] = field(default_factory=set)
    #: flip one byte in the body of the first GET of these blobs (digests) only
    corrupt_first_get: set[str] = field(default_factory=set)
    #: GETs of these blobs (digests) wait until ``release()`` (or the proxy stops)
    hold_blobs: set[str] = field(default_factory=set)
    #: seconds each blob GET waits before it is forwarded (a distant registry)
    blob_delay: float = 0.0
    #: bytes per second at which blob bodies are sent (a slow link); None: at once
    blob_rate: float | None = None
    #: append a space to every manifest body (still JSON, another digest)
    pad_manifests: bool = False
    #: answer 503 to the first N requests whose path contains the key
    fail_first: dict[str, int] = field(default_factory=dict)
    #: require Bearer tokens from /token, which checks these Basic credentials
    bearer_user: str | None = None
    bearer_password: str | None = None
    token_lifetime: int = 300


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


class MisbehavingProxy:
    def __init__(self, upstream: str, behaviour: Behaviour) -> None:
        self.upstream = upstream
        self.behaviour = behaviour
        self.seen: list[Seen] = []
        self.tokens: dict[str, str] = {}  # token -> scope
        self._cut: set[object] = set()
        self._stop = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def requests(self, path_part: str = "", method: str | None = None) -> list[Seen]:
        return [
            s for s in self.seen if path_part in s.path and (method is None or s.method == method)
        ]

    def release(self) -> None:
        """Let the held blob GETs go on."""
        self._released.set()

    def revoke_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            def do_HEAD(self) -> None:
                proxy._handle(self)

        return Handler

    def _reply(
        self,
        h: BaseHTTPRequestHandler,
        seen: Seen,
        status: int,
        body: bytes,
        headers: dict[str, str],
    ) -> None:
        seen.status = status
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        b = self.behaviour
        seen = Seen(h.command, h.path, {k.lower(): v for k, v in h.headers.items()})
        with self._lock:
            self.seen.append(seen)
            for key, count in b.fail_first.items():
                if key in h.path and count > 0:
                    b.fail_first[key] = count - 1
                    self._reply(h, seen, 503, b'{"errors":[{"code":"UNAVAILABLE"}]}', {})
                    return
        if b.bearer_user is not None and not self._authorised(h, seen):
            return
        headers: dict[str, str] = {}
        for k, v in h.headers.items():
            if k.lower() not in ("host", "authorization", "connection"):
                # repeated fields (skopeo sends one Accept per media type) as one list
                headers[k] = f"{headers[k]}, {v}" if k in headers else v
        if b.ignore_range:
            headers.pop("Range", None)
            headers.pop("range", None)
        if b.blob_delay and _BLOB.match(h.path) and h.command == "GET":
            self._stop.wait(b.blob_delay)
        held = _BLOB.match(h.path) and any(d in h.path for d in b.hold_blobs)
        if held and h.command == "GET":
            while not (self._released.is_set() or self._stop.is_set()):
                self._released.wait(0.05)
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            conn.request(h.command, h.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        seen.status = resp.status
        blob = _BLOB.match(h.path)
        corrupt = b.corrupt_blobs or any(d in h.path for d in b.corrupt_only)
        if blob and h.command == "GET" and any(d in h.path for d in b.corrupt_first_get):
            with self._lock:
                if ("corrupt", h.path) not in self._cut:
                    self._cut.add(("corrupt", h.path))
                    corrupt = True
        if blob and h.command == "GET" and resp.status in (200, 206) and corrupt and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if b.pad_manifests and "/manifests/" in h.path and resp.status == 200:
            body += b" "
        cut_at = None
        stall_at = None
        if (
            blob
            and h.command == "GET"
            and b.stall_blob_after is not None
            and len(body) > b.stall_blob_after
        ):
            with self._lock:
                if ("stall", h.path) not in self._cut:
                    self._cut.add(("stall", h.path))
                    stall_at = b.stall_blob_after
        if (
            blob
            and h.command == "GET"
            and b.cut_blob_after is not None
            and len(body) > b.cut_blob_after
        ):
            with self._lock:
                if h.path not in self._cut:
                    self._cut.add(h.path)
                    cut_at = b.cut_blob_after
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if stall_at is not None:
            h.wfile.write(body[:stall_at])
            h.wfile.flush()
            self._stop.wait()
            h.close_connection = True
            return
        if cut_at is not None:
            h.wfile.write(body[:cut_at])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the peer sees a short body: a broken download
            return
        if blob and b.blob_rate:
            self._trickle(h, body, b.blob_rate)
            return
        h.wfile.write(body)

    def _trickle(self, h: BaseHTTPRequestHandler, body: bytes, rate: float) -> None:
        """Send ``body`` at ``rate`` bytes per second, until the client goes or the proxy stops."""
        step = max(1, int(rate / 20))  # 20 writes a second
        try:
            for start in range(0, len(body), step):
                if self._stop.wait(step / rate):
                    h.close_connection = True
                    return
                h.wfile.write(body[start : start + step])
                h.wfile.flush()
        except OSError:  # the client hung up (a cancelled download)
            h.close_connection = True

    def _authorised(self, h: BaseHTTPRequestHandler, seen: Seen) -> bool:
        b = self.behaviour
        if h.path.startswith("/token"):
            expected = base64.b64encode(f"{b.bearer_user}:{b.bearer_password}".encode()).decode()
            if h.headers.get("Authorization") != f"Basic {expected}":
                self._reply(h, seen, 401, b'{"details":"bad credentials"}', {})
                return False
            scope = " ".join(parse_qs(urlsplit(h.path).query).get("scope", []))
            token = secrets.token_hex(16)
            with self._lock:
                self.tokens[token] = scope
            body = json.dumps({"token": token, "expires_in": b.token_lifetime}).encode()
            self._reply(h, seen, 200, body, {"Content-Type": "application/json"})
            return False
        auth = h.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        repo = _REPO.match(h.path)
        wanted = f"repository:{repo.group(1)}:pull" if repo else ""
        with self._lock:
            granted = self.tokens.get(token)
        if granted is not None and (not wanted or granted == wanted):
            return True
        challenge = f'Bearer realm="http://{self.host}/token",service="proxy-test"'
        if wanted:
            challenge += f',scope="{wanted}"'
        self._reply(
            h, seen, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge}
        )
        return False


@contextmanager
def misbehaving_proxy(
    upstream: str, behaviour: Behaviour | None = None
) -> Iterator[MisbehavingProxy]:
    proxy = MisbehavingProxy(upstream, behaviour or Behaviour())
    # a short poll: shutdown() waits for it (0.5 s by default, at every proxy's end)
    thread = threading.Thread(
        target=proxy.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield proxy
    finally:
        proxy._stop.set()
        proxy.server.shutdown()
        proxy.server.server_close()
        thread.join()
