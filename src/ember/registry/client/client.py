"""A registry API v2 client for pulling: auth, manifests, verified blob downloads.

HTTP/1.1 through ``transport`` (the standard library's http.client).
Transport policy: HTTPS, except for loopback registries (``localhost``,
``127.0.0.0/8``, ``::1``, as Docker does) and hosts the caller names as
plain-HTTP.  Requests are retried with exponential backoff on connection
errors, 429 and 5xx; a 401 triggers one authentication round (bearer token
from the challenge's realm, or Basic) and one retry.  Blobs are written
through ``ContentStore.writer``, which verifies digest and size before the
blob becomes visible; an interrupted download resumes with ``Range`` from
what the ingest file already holds.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode

from ember import __version__, jsonutil
from ember.oci import mediatypes as mt
from ember.oci.digest import Digest, Verifier
from ember.oci.errors import DigestMismatch, InvalidDigest
from ember.oci.manifest import MAX_MANIFEST_SIZE, Descriptor
from ember.registry.client.auth import (
    Challenge,
    ChallengeTooLarge,
    TokenCache,
    parse_challenges,
    pull_scope,
    repository_of,
)
from ember.registry.client.credentials import Credentials
from ember.registry.client.errors import (
    AuthenticationFailed,
    BlobCorrupt,
    BlobUnknown,
    ManifestUnknown,
    RateLimited,
    RegistryError,
    RegistryProtocolError,
    RegistryUnreachable,
)
from ember.registry.client.transport import ConnectionPool, Response, TransportError, split_url
from ember.store.content import BlobWriter, ContentStore, WriteObserver

_MAX_TOKEN_RESPONSE = 1 << 20
_MAX_ERROR_BODY = 64 * 1024
#: seconds a request, or a blob download, waits in all between its tries at most: a
#: Retry-After (429, 503) that would take it past this is not waited for, the error is
#: said at once (a rate limit of minutes is better told than sat through)
MAX_RETRY_WAIT = 30.0
USER_AGENT = f"ember/{__version__}"

#: called with the number of bytes just received (negative: a restart discarded them)
ProgressCallback = Callable[[int], None]


class CancelToken(Protocol):
    """How another thread stops a blob download (``ember.images.cancel.Cancellation``)."""

    def check(self) -> None:
        """Raise (the token's own exception) once cancelled."""

    def wait(self, seconds: float) -> None:
        """Sleep, cut short and raising once cancelled."""

    def watch(self, abort: Callable[[], None]) -> AbstractContextManager[None]:
        """While inside, cancelling calls ``abort`` from the cancelling thread."""


def _tls_context(host: str, plain_http: bool) -> ssl.SSLContext:
    """Certificate verification as Python's default context sets it up, with a clear error when it cannot.

    ``SSL_CERT_FILE``/``SSL_CERT_DIR`` are honoured.  A plain-HTTP registry
    only needs TLS if it redirects to HTTPS, so its context uses the hashed
    certificate directory alone, which OpenSSL reads lazily (loading the whole
    bundle costs tens of milliseconds per process), and a broken setting does
    not stop it.
    """
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if plain_http:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, checks host names
        directory = capath or ssl.get_default_verify_paths().capath
        if directory and os.path.isdir(directory):
            ctx.load_verify_locations(capath=directory)
        return ctx
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as e:
        raise RegistryError(
            f"cannot set up TLS for {host}: {e}", hint="check SSL_CERT_FILE and SSL_CERT_DIR"
        ) from None


def uses_plain_http(host: str) -> bool:
    """Loopback registries are spoken to in plain HTTP first, as Docker treats them
    as insecure registries (one that wants HTTPS gets it: ``RegistryClient.request``)."""
    name = host.lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    else:
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    if name.endswith(".localhost"):
        # RFC 6761 names it loopback, but a resolver that asks DNS for it (glibc's, by
        # /etc/nsswitch.conf) may get anything: trusted by what it resolves to, as
        # Docker decides by the addresses
        return _resolves_to_loopback(name)
    return False


def _resolves_to_loopback(name: str) -> bool:
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: Digest


def _error_detail(resp: Response) -> str:
    """The first message of a distribution-spec error body, if any."""
    try:
        body = b""
        for chunk in resp.iter_bytes():
            body += chunk
            if len(body) >= _MAX_ERROR_BODY:
                return ""  # not a distribution-spec error document
        doc = jsonutil.loads(body)
        err = doc["errors"][0]
        code, message = str(err.get("code", "")), str(err.get("message", ""))
        text = f"{code}: {message}" if code else message
        # the server's words end up on a terminal: no control characters
        return "".join(c if c.isprintable() else "?" for c in text[:300])
    except Exception:
        return ""


def _parsed_digest(value: str | None) -> Digest | None:
    """A Docker-Content-Digest header's digest; None when there is none or it does not
    parse (an algorithm ember does not know, junk)."""
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except InvalidDigest:
        return None


def _denial_detail(resp: Response) -> str:
    """What a refusing 401 says: its challenge's ``error`` (and ``error_description``),
    and its body's distribution-spec error, printable, short."""
    words: list[str] = []
    try:
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate") or "")
    except ChallengeTooLarge:
        challenges = []
    for c in challenges[:1]:
        words += [c.params[k] for k in ("error", "error_description") if c.params.get(k)]
    words.append(_error_detail(resp))
    text = "; ".join(w for w in words if w)[:300]
    return "".join(c if c.isprintable() else "?" for c in text)


def _wants_https(resp: Response) -> bool:
    """Whether a 400 says the server speaks HTTPS on that port (Go's "Client sent an
    HTTP request to an HTTPS server.", nginx's "The plain HTTP request was sent to
    HTTPS port").  Closes the response when it does; otherwise its body is read
    (a 400 of a plain-HTTP registry then comes without its error detail)."""
    head = b""
    try:
        for chunk in resp.iter_bytes():
            head += chunk
            if len(head) >= 1024:
                break
    except TransportError:
        return False
    if b"HTTPS" in head:
        resp.close()
        return True
    return False


class RegistryClient:
    def __init__(
        self,
        host: str,
        *,
        plain_http: bool = False,
        credentials: Credentials | None = None,
        retries: int = 4,
        backoff: float = 0.2,
        timeout: float = 60.0,
        max_connections: int = 8,
        api_host: str | None = None,
        max_retry_wait: float = MAX_RETRY_WAIT,
    ) -> None:
        self.host = host
        self.api_host = api_host or host
        self.plain_http = plain_http or uses_plain_http(self.api_host)
        #: a loopback registry not asked for in plain HTTP may turn out to serve HTTPS
        self._may_want_https = self.plain_http and not plain_http
        self.base_url = f"{'http' if self.plain_http else 'https'}://{self.api_host}/v2/"
        try:
            # every request's URL starts with this one: a bad host or port is the caller's
            # mistake, said once here rather than as a failure to connect
            split_url(self.base_url)
        except ValueError as e:
            raise RegistryError(f"invalid registry address {self.api_host[:200]!r}: {e}") from None
        self.credentials = credentials
        self.retries = retries
        self.backoff = backoff
        self.max_retry_wait = max_retry_wait
        #: how the client waits between tries (tests record the pauses instead)
        self._sleep: Callable[[float], None] = time.sleep
        # follows redirects, dropping Authorization when one leaves the origin
        host_ = self.api_host
        self.http = ConnectionPool(
            # a plain-HTTP registry needs TLS only if it redirects to HTTPS: made then
            ssl_context=(lambda: _tls_context(host_, True))
            if self.plain_http
            else _tls_context(host_, False),
            timeout=timeout,
            connect_timeout=15.0,
            max_idle=max_connections,
            user_agent=USER_AGENT,
            plain_http_ok=self._may_send_in_clear,
        )
        self.tokens = TokenCache()
        self._challenge: Challenge | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- authentication ------------------------------------------------------

    def _basic(self) -> str | None:
        if self.credentials is None:
            return None
        raw = f"{self.credentials.username}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _authorization(self, scope: str | None) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic()
        realm, service = challenge.realm or "", challenge.params.get("service", "")
        scopes = scope or challenge.params.get("scope", "")
        token = self.tokens.get(realm, service, scopes)
        if token is None:
            token = self._fetch_token(realm, service, scopes)
        return f"Bearer {token}"

    def _fetch_token(self, realm: str, service: str, scope: str) -> str:
        try:
            if not realm.isascii():  # (http.client cannot send it: a traceback)
                raise ValueError(realm)
            origin, _target = split_url(realm)
        except ValueError:
            raise RegistryProtocolError(
                f"registry {self.host} names an invalid token realm {realm[:200]!r}"
            ) from None
        if origin.scheme == "http" and not self._may_send_in_clear(origin.host):
            # Credentials would cross the network in clear text.
            raise RegistryProtocolError(
                f"registry {self.host} asks for a token from a plain-HTTP realm {realm[:200]}: refused"
            )
        params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        headers = {"Accept-Encoding": "identity"}  # JSON read as is, never decoded
        basic = self._basic()
        if basic:
            headers["Authorization"] = basic
        query = urlencode(params)
        url = realm.split("#", 1)[0]
        if query:
            url += ("&" if "?" in url else "?") + query
        resp = self._with_retries(
            lambda: self.http.send("GET", url, headers), token_service=f"{origin.host}:{origin.port}"
        )
        try:
            if resp.status_code in (401, 403):
                raise self._auth_failed()
            if resp.status_code == 429:
                raise self._rate_limited(f"a token from {origin.host}", resp)
            if resp.status_code != 200:
                raise RegistryError(
                    f"token service {origin.host} answered HTTP {resp.status_code} for {self.host}"
                )
            body = b""
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > _MAX_TOKEN_RESPONSE:
                    raise RegistryProtocolError(
                        f"token service {origin.host} sent an oversized answer"
                    )
            try:
                doc = jsonutil.loads(body)
                token = doc.get("token") or doc.get("access_token")
                expires_in = doc.get("expires_in")
            except (ValueError, AttributeError):
                token, expires_in = None, None
            if (
                not isinstance(token, str)
                or not token
                or len(token) > 64 * 1024
                or not token.isprintable()
                or not token.isascii()  # a header value: http.client cannot send others
            ):
                raise RegistryProtocolError(f"token service {origin.host} returned no usable token")
            if not isinstance(expires_in, int) or isinstance(expires_in, bool):
                expires_in = None
        finally:
            resp.close()
        self.tokens.put(realm, service, scope, token, expires_in)
        return token

    def _may_send_in_clear(self, host: str) -> bool:
        """Whether credentials may go to ``host`` over plain HTTP: a loopback host, or
        the registry's own when it is spoken to in plain HTTP (loopback, or the user
        said --plain-http for it); never a third host, whatever the registry is."""
        if uses_plain_http(host):
            return True
        own = split_url(self.base_url)[0].host
        return self.plain_http and host.lower() == own.lower()

    def _auth_failed(self) -> AuthenticationFailed:
        if self.credentials is None:
            return AuthenticationFailed(
                f"registry {self.host} requires authentication",
                hint=f"run: ember registry login {self.host}",
            )
        return AuthenticationFailed(
            f"registry {self.host} refused the credentials for user {self.credentials.username!r}",
            hint=f"check them with: ember registry login {self.host}",
        )

    def _refused_after_auth(self, resp: Response, scope: str | None) -> AuthenticationFailed:
        """The error for a 401 that follows an authentication round.  After a Bearer
        token was granted (the token service took the credentials, or gave an anonymous
        token), it means that token does not reach the repository: Docker Hub says so
        (``insufficient_scope``) for a repository that does not exist as for one the
        user may not read, and cannot be told apart from here, so both are said."""
        challenge = self._challenge
        repository = repository_of(scope) if scope else None
        if challenge is None or challenge.scheme != "bearer" or repository is None:
            return self._auth_failed()
        who = f"user {self.credentials.username!r}" if self.credentials else "anonymous users"
        detail = _denial_detail(resp)
        return AuthenticationFailed(
            f"access to {repository} on {self.host} denied: it does not exist, or {who} "
            f"may not pull it" + (f" ({detail})" if detail else ""),
            hint=None if self.credentials else f"if it is private, run: ember registry login {self.host}",
        )

    def _learn_challenge(self, resp: Response) -> None:
        try:
            challenges = parse_challenges(resp.headers.get("WWW-Authenticate") or "")
        except ChallengeTooLarge as e:
            raise RegistryProtocolError(f"registry {self.host} sent {e}: refused") from None
        by_scheme = {c.scheme: c for c in challenges}
        chosen = by_scheme.get("bearer") or by_scheme.get("basic")
        if chosen is None:
            raise AuthenticationFailed(
                f"registry {self.host} requires an authentication scheme ember does not support"
            )
        if chosen.scheme == "bearer" and not chosen.realm:
            raise RegistryProtocolError(
                f"registry {self.host} sent a Bearer challenge without a realm"
            )
        if chosen.scheme == "basic" and self.credentials is None:
            raise self._auth_failed()
        with self._lock:
            self._challenge = chosen

    # -- requests ------------------------------------------------------------

    def _with_retries(
        self,
        send: Callable[[], Response],
        token_service: str | None = None,
        *,
        retry_statuses: bool = True,
    ) -> Response:
        """Run ``send`` until it gives an answer that is neither 5xx nor 429, backing off
        between tries, or as long as a Retry-After asks (``_pause``); the last answer is
        returned when the tries are used up, or at once when it asks for a longer wait.
        ``retry_statuses=False``: only connection failures are retried here, 5xx and 429
        are returned at once (a blob download retries them itself: both loops made 25
        requests of one 429).  ``token_service``: the host sent to is the registry's
        token service, and the error says so (the registry itself answered)."""
        attempt, waited = 0, 0.0
        while True:
            try:
                resp = send()
            except TransportError as e:
                if e.tls:
                    # Retrying will not fix TLS; say what usually causes it.
                    hint = (
                        None
                        if self.plain_http
                        else f"if {self.host} serves plain HTTP, use --plain-http"
                    )
                    raise RegistryUnreachable(
                        f"TLS with {self._peer(token_service)} failed ({str(e)[:200]})",
                        hint=hint,
                    ) from None
                if self._gives_up(e, attempt):
                    raise self._unreachable(e, token_service) from None
                pause = self.backoff * (2**attempt)
            else:
                if not (retry_statuses and _transient(resp.status_code)) or attempt >= self.retries:
                    return resp
                asked = self._pause(attempt, _retry_after(resp), waited)
                if asked is None:
                    return resp  # it asks to wait longer than ember would: told at once
                resp.close()
                pause = asked
            self._sleep(pause)
            waited += pause
            attempt += 1

    def _pause(self, attempt: int, retry_after: float | None, waited: float) -> float | None:
        """Seconds to wait before the try after ``attempt`` (from 0): the backoff, or what
        a Retry-After asks when that is longer; None when it would take the waits of this
        request past ``max_retry_wait``."""
        backoff = self.backoff * (2**attempt)
        if retry_after is None or retry_after <= backoff:
            return backoff
        if waited + retry_after > self.max_retry_wait:
            return None
        return retry_after

    def _gives_up(self, e: Exception, attempt: int, *, progressed: bool = False) -> bool:
        """Whether failure ``e`` of try ``attempt`` (from 0) ends the retries.  A peer that
        stayed silent for the whole timeout gets one more try, not ``retries``: four more
        would leave the user waiting minutes without a word.  A download that timed out
        after it ``progressed`` is retried like any cut connection (it resumes)."""
        if isinstance(e, TransportError) and e.timed_out and not progressed:
            return attempt >= min(1, self.retries)
        return attempt >= self.retries

    def _peer(self, token_service: str | None) -> str:
        if token_service is None:
            return f"registry {self.host}"
        return f"the token service {token_service} of registry {self.host}"

    def _unreachable(
        self, e: TransportError, token_service: str | None = None
    ) -> RegistryUnreachable:
        if e.timed_out:
            return RegistryUnreachable(
                f"{self._peer(token_service)} did not answer in time ({str(e)[:200]})",
                hint="check that the address is the registry's and that it is not overloaded",
            )
        return RegistryUnreachable(
            f"cannot reach {self._peer(token_service)} "
            f"({type(e).__name__}: {str(e)[:200] or 'no detail'})"
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str | None = None,
        headers: dict[str, str] | None = None,
        retry_statuses: bool = True,
    ) -> Response:
        """One API request with auth and retries (of 5xx and 429 too, unless
        ``retry_statuses`` is false); the caller closes the response (its body is read
        as it arrives)."""
        authenticated_once = False
        while True:
            url = self.base_url + path

            def send(url: str = url) -> Response:
                # bodies are hashed as they come and never decoded: asked for as they are
                hdrs = {"Accept-Encoding": "identity", **(headers or {})}
                auth = self._authorization(scope)
                if auth:
                    hdrs["Authorization"] = auth
                return self.http.send(method, url, hdrs)

            resp = self._with_retries(send, retry_statuses=retry_statuses)
            if resp.status_code == 400 and self.plain_http and _wants_https(resp):
                if self._may_want_https:
                    self._switch_to_https()
                    continue
                raise RegistryError(
                    f"registry {self.host} serves HTTPS on that port, not plain HTTP",
                    hint="leave out --plain-http",
                )
            if resp.status_code != 401:
                return resp
            try:
                answered = resp.origin
                if answered.host != split_url(url)[0].host:
                    # A host the registry redirected to (a CDN, a bucket) asks for
                    # credentials: its challenge is not the registry's, and following it
                    # would send the registry's password to a token service of its choosing.
                    raise RegistryError(
                        f"registry {self.host} redirected a request to {answered.netloc}, "
                        "which asks for credentials: ember sends it none of the registry's"
                    )
                if authenticated_once:
                    raise self._refused_after_auth(resp, scope)
            finally:
                resp.close()
            # A cached token may have been revoked: forget it, then follow the new challenge.
            challenge = self._challenge
            if challenge is not None and challenge.scheme == "bearer":
                self.tokens.drop(
                    challenge.realm or "",
                    challenge.params.get("service", ""),
                    scope or challenge.params.get("scope", ""),
                )
            self._learn_challenge(resp)
            authenticated_once = True

    def _switch_to_https(self) -> None:
        """A loopback registry that turned out to serve HTTPS: spoken to in HTTPS from
        now on, its certificate unchecked, as Docker does for loopback registries
        (the bytes stay on this host, and a certificate made for ``localhost`` is
        usually self-signed)."""
        with self._lock:
            if not self.plain_http:
                return
            self.plain_http = self._may_want_https = False
            self.base_url = f"https://{self.api_host}/v2/"
            self.http.accept_any_certificate(split_url(self.base_url)[0])

    def ping(self, scope: str | None = None) -> None:
        """Check that the registry is there and accepts our credentials (``GET /v2/``)."""
        resp = self.request("GET", "", scope=scope)
        try:
            if resp.status_code == 429:
                raise self._rate_limited("/v2/", resp)
            if resp.status_code != 200:
                raise RegistryError(
                    f"registry {self.host} answered HTTP {resp.status_code} on /v2/"
                )
        finally:
            resp.close()

    def _check(self, resp: Response, what: str, not_found: type[RegistryError]) -> None:
        if resp.status_code == 200:
            return
        if resp.status_code == 429:
            raise self._rate_limited(what, resp)
        detail = _error_detail(resp)
        suffix = f" ({detail})" if detail else ""
        if resp.status_code == 404:
            raise not_found(f"{what} not found on {self.host}{suffix}")
        if resp.status_code == 403:
            raise AuthenticationFailed(f"registry {self.host} denies access to {what}{suffix}")
        asked = _retry_after(resp) if resp.status_code == 503 else None
        if asked is not None:  # (longer than ember waits, or it would have been waited for)
            raise RegistryError(
                f"registry {self.host} answered HTTP 503 for {what}{suffix} and asks to wait "
                f"{math.ceil(asked)} s",
                hint=f"try again in {math.ceil(asked)} s",
            )
        raise RegistryError(
            f"registry {self.host} answered HTTP {resp.status_code} for {what}{suffix}"
        )

    def _rate_limited(self, what: str, resp: Response | None, retry_after: float | None = None) -> RateLimited:
        """The error for a 429 that outlasted the retries (or asked for a longer wait)."""
        if resp is not None:
            retry_after = _retry_after(resp)
            detail = _error_detail(resp)
        else:
            detail = ""
        when = f"in {math.ceil(retry_after)} s" if retry_after else "later"
        login = "" if self.credentials else f" (or log in: ember registry login {self.host})"
        return RateLimited(
            f"registry {self.host} rate limited the requests for {what} (HTTP 429"
            + (f": {detail})" if detail else ")"),
            hint=f"try again {when}{login}",
        )

    # -- manifests -----------------------------------------------------------

    def get_manifest(
        self, repository: str, target: str, *, display: str | None = None
    ) -> FetchedManifest:
        """The manifest or index for a tag or digest, verified when asked by digest."""
        what = display or f"{self.host}/{repository}:{target}"
        attempt = 0
        while True:
            try:
                body, media_type, header_digest = self._manifest_once(repository, target, what)
                break
            except TransportError as e:
                # The connection was cut mid-body (a failure to connect was already
                # retried inside the request): retried like one, as blobs are.
                if self._gives_up(e, attempt):
                    raise self._unreachable(e) from None
            self._sleep(self.backoff * (2**attempt))
            attempt += 1
        if target.startswith(("sha256:", "sha512:")):
            digest = Digest.parse(target)
            said = "the digest asked for"
        else:
            # By tag, the registry's Docker-Content-Digest is the only word on what the
            # body should be (a proxy or cache on the way may have changed it): checked
            # when it is a digest at all, else ignored (some registries send none).
            digest = _parsed_digest(header_digest) or Digest.of(body)
            said = "its Docker-Content-Digest header"
        check = Verifier(digest)
        check.update(body)
        try:
            check.verify()
        except DigestMismatch:
            raise BlobCorrupt(
                f"registry {self.host} served a manifest for {what} that does not match "
                f"{digest} ({said}): it is {Digest.of(body, digest.algorithm)}"
            ) from None
        return FetchedManifest(body, media_type, digest)

    def _manifest_once(
        self, repository: str, target: str, what: str
    ) -> tuple[bytes, str, str | None]:
        """(body, media type, Docker-Content-Digest) of one GET; TransportError if the body is cut."""
        resp = self.request(
            "GET",
            f"{repository}/manifests/{target}",
            scope=pull_scope(repository),
            headers={"Accept": mt.MANIFEST_ACCEPT},
        )
        try:
            self._check(resp, f"image {what}", ManifestUnknown)
            data = bytearray()
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > MAX_MANIFEST_SIZE:
                    raise RegistryProtocolError(
                        f"manifest of {what} is larger than {MAX_MANIFEST_SIZE} bytes: refused"
                    )
            media_type = resp.headers.get("Content-Type") or ""
            header_digest = resp.headers.get("Docker-Content-Digest")
        finally:
            resp.close()
        return bytes(data), media_type, header_digest

    # -- blobs ---------------------------------------------------------------

    @contextmanager
    def _blob_stream(
        self, repository: str, desc: Descriptor, offset: int
    ) -> Iterator[Response]:
        headers: dict[str, str] = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = self.request(
            "GET",
            f"{repository}/blobs/{desc.digest}",
            scope=pull_scope(repository),
            headers=headers,
            retry_statuses=False,  # _download_retrying retries them, resuming
        )
        try:
            yield resp
        finally:
            resp.close()

    def fetch_blob(
        self,
        repository: str,
        desc: Descriptor,
        store: ContentStore,
        progress: ProgressCallback | None = None,
        *,
        cancel: CancelToken | None = None,
        observer: WriteObserver | None = None,
    ) -> None:
        """Download one blob into the content store, verified; resumes after a cut connection.

        ``observer`` follows the ingest file as it is written (see ``BlobWriter.watch``);
        it hears nothing of a blob the store already has.

        ``cancel`` stops the download between chunks, and a cancel while a read waits on
        the connection shuts the connection down (``Response.abort``), so a stalled registry does
        not hold the caller for the read timeout.  What arrived stays in the ingest file
        for the next try to resume.
        """
        # None too for a stored copy damaged since it was verified: removed, fetched again
        stored = store.size_for_reuse(desc.digest, desc.size)
        if stored is not None:
            # an intact stored copy: a descriptor that gives another size is lying (and
            # the image's size, counted from its descriptors, would be)
            if stored != desc.size:
                raise RegistryError(
                    f"{repository} on {self.host} describes blob {desc.digest} as {desc.size} "
                    f"bytes; it is {stored} (the copy in the local store matches its digest: "
                    "the image's manifest is wrong)"
                )
            if progress:
                progress(desc.size)
            return
        if cancel is not None:
            cancel.check()
        with store.writer(desc.digest, desc.size) as writer:
            if writer.already_committed:
                if progress:
                    progress(desc.size)
                return
            if observer is not None:
                writer.watch(observer)
            if progress and writer.offset:
                progress(writer.offset)
            # Bytes kept from an earlier try are checked only with the rest: a whole that
            # does not match may be their fault (a corrupt body cut short by a cancel), so
            # a resumed blob that fails its digest is fetched once more, from its start.
            resumed = writer.offset > 0
            while True:
                self._download_retrying(repository, desc, writer, progress, cancel)
                if cancel is not None:
                    # A body cut by the abort can end like a whole one: keep it for a resume
                    # rather than verify it (which discards what does not match).
                    cancel.check()
                # every byte counted in progress is in the file (and no more: a chunk
                # beyond the size is refused before it is counted)
                held = writer.offset
                try:
                    writer.commit()
                    return
                except DigestMismatch as e:  # the writer has emptied the file
                    if progress:
                        progress(-held)
                    if not resumed:
                        raise BlobCorrupt(
                            f"registry {self.host} served a corrupt blob: {e}"
                        ) from None
                    resumed = False

    def _download_retrying(
        self,
        repository: str,
        desc: Descriptor,
        writer: BlobWriter,
        progress: ProgressCallback | None,
        cancel: CancelToken | None,
    ) -> None:
        """The rest of the blob into ``writer``, resuming after cut connections until the
        retries run out."""
        attempt, waited = 0, 0.0
        while True:
            before = writer.offset
            try:
                self._download_into(repository, desc, writer, progress, cancel)
                return
            except (TransportError, _Retry) as e:
                if cancel is not None:
                    cancel.check()  # an aborted read looks like a cut connection
                retry_after = e.retry_after if isinstance(e, _Retry) else None
                pause = (
                    None
                    if self._gives_up(e, attempt, progressed=writer.offset > before)
                    else self._pause(attempt, retry_after, waited)
                )
                if pause is None:
                    raise self._download_failed(desc, e) from None
                if cancel is not None:
                    cancel.wait(pause)
                else:
                    self._sleep(pause)
                waited += pause
                attempt += 1

    def _download_failed(self, desc: Descriptor, e: TransportError | _Retry) -> RegistryError:
        if isinstance(e, _Retry) and e.status == 429:
            return self._rate_limited(f"blob {desc.digest.short}", None, e.retry_after)
        stalled = isinstance(e, TransportError) and e.timed_out
        # a 503 whose Retry-After asked for more than ember waits was tried once: said so
        asked = e.retry_after if isinstance(e, _Retry) else None
        return RegistryUnreachable(
            f"download of blob {desc.digest.short} from {self.host} "
            + (
                f"stalled: no data for {self.http.timeout:g} s"
                if stalled
                else f"keeps failing ({e or type(e).__name__})"
                if asked is None
                else f"failed ({e}) and the registry asks to wait {math.ceil(asked)} s"
            ),
            hint=None if asked is None else f"try again in {math.ceil(asked)} s",
        )

    def _download_into(
        self,
        repository: str,
        desc: Descriptor,
        writer: BlobWriter,
        progress: ProgressCallback | None,
        cancel: CancelToken | None = None,
    ) -> None:
        offset = writer.offset
        if offset >= desc.size and desc.size > 0:
            return  # everything is here already; commit verifies it
        with self._blob_stream(repository, desc, offset) as resp:
            watching = cancel.watch(resp.abort) if cancel else nullcontext()
            with watching:  # raises at once if cancelled while the request was answered
                self._read_blob(desc, resp, writer, offset, progress, cancel)

    def _read_blob(
        self,
        desc: Descriptor,
        resp: Response,
        writer: BlobWriter,
        offset: int,
        progress: ProgressCallback | None,
        cancel: CancelToken | None,
    ) -> None:
        if resp.status_code == 416 and offset:
            # The server cannot serve our range: start again from zero, unless it says the
            # blob is not the size its descriptor declares ("bytes */TOTAL")
            self._restart(writer, progress)
            self._refuse_other_size(desc, _content_range_total(resp))
            raise _Retry("range not satisfiable")
        if _transient(resp.status_code):
            raise _Retry(f"HTTP {resp.status_code}", resp.status_code, _retry_after(resp))
        if offset and resp.status_code == 200:
            self._restart(writer, progress)  # the server ignored Range: full body follows
        elif resp.status_code == 206:
            start = _content_range_start(resp.headers.get("Content-Range") or "")
            if start != offset:
                raise RegistryProtocolError(
                    f"registry {self.host} answered a range request for {desc.digest.short} with the wrong range"
                )
        else:
            self._check(resp, f"blob {desc.digest}", BlobUnknown)
        counted = writer.offset  # what progress has been told of (the restarts above included)
        try:
            # No re-chunking: every byte received is written before a cut
            # connection (or a cancel) raises, so a resume loses nothing.
            for chunk in resp.iter_bytes():
                writer.write(chunk)
                counted += len(chunk)
                if progress:
                    progress(len(chunk))
                if cancel is not None:
                    cancel.check()
        except DigestMismatch as e:
            # a chunk that overran the size: refused before it was written or counted
            if progress and counted:
                progress(-counted)
            writer.reset()
            raise BlobCorrupt(f"registry {self.host} served a corrupt blob: {e}") from None
        if writer.offset < desc.size:
            # The whole answer came and the blob is smaller than its descriptor says (a
            # wrong manifest): no resume can mend that, say it now.
            whole = _content_range_total(resp) if resp.status_code == 206 else _length(resp)
            if whole is not None and whole != desc.size:
                self._restart(writer, progress)
                self._refuse_other_size(desc, whole)
            # Else a body that ended cleanly but short (no Content-Length, the server
            # closed; or only part of the range asked for): a cut connection like any
            # other, resumed with Range; committing it would fail the size check and
            # throw away what did arrive.
            raise TransportError(f"body ended {desc.size - writer.offset} bytes short")

    def _refuse_other_size(self, desc: Descriptor, size: int | None) -> None:
        """BlobCorrupt when the registry says the blob has ``size`` bytes, not the
        descriptor's (None: it did not say)."""
        if size is not None and size != desc.size:
            raise BlobCorrupt(
                f"registry {self.host} serves blob {desc.digest} with {size} bytes; its "
                f"descriptor declares {desc.size}"
            )

    @staticmethod
    def _restart(writer: BlobWriter, progress: ProgressCallback | None) -> None:
        if progress and writer.offset:
            progress(-writer.offset)
        writer.reset()


class _Retry(Exception):
    """A transient failure inside a download: back off (or wait what ``retry_after``
    asks) and resume."""

    def __init__(self, message: str, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def _transient(status: int) -> bool:
    """An HTTP status worth another try: 5xx, and 429 (rate limited)."""
    return status >= 500 or status == 429


#: a Retry-After in seconds: digits only, and not so many that int() works hard
_DELTA_SECONDS = re.compile(r"[0-9]{1,9}")


def _retry_after(resp: Response) -> float | None:
    """What a 429's or 503's Retry-After asks to wait, in seconds (delta-seconds or an
    HTTP-date); None without one, or one that does not parse."""
    if resp.status_code not in (429, 503):
        return None
    value = (resp.headers.get("Retry-After") or "").strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    if not value:
        return None
    # here only: a few milliseconds of imports every pull would pay for a rare header
    import email.utils
    from datetime import UTC, datetime

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # "-0000": UTC, said without a zone
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _content_range_total(resp: Response) -> int | None:
    """The TOTAL of a ``Content-Range: bytes START-END/TOTAL`` (or ``bytes */TOTAL``);
    None when there is none, it is ``*`` or it does not parse."""
    unit, _, rng = (resp.headers.get("Content-Range") or "").strip().partition(" ")
    total = rng.rpartition("/")[2]
    if unit.lower() != "bytes" or not (total.isascii() and total.isdigit()) or len(total) > 19:
        return None
    return int(total)


def _length(resp: Response) -> int | None:
    """A whole answer's Content-Length, when it has one that parses."""
    value = (resp.headers.get("Content-Length") or "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 19 else None


def _content_range_start(value: str) -> int | None:
    # "bytes START-END/TOTAL"
    try:
        unit, _, rng = value.strip().partition(" ")
        if unit.lower() != "bytes":
            return None
        return int(rng.split("-", 1)[0])
    except ValueError:
        return None
