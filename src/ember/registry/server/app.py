"""The registry's ASGI application: ``/v2/`` (distribution API) and ``/token``.

Request order, for every ``/v2/`` request: parse and sanity-check the raw path
(dot segments, encodings: refused before anything else), authenticate, rewrite
the repository name into the caller's organization, check the action on that
qualified name, then act.  Every blob read and mount source is checked against
the links of the repository named in the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ember.oci import mediatypes as mt
from ember.oci.digest import Digest
from ember.oci.errors import FormatError
from ember.oci.manifest import MAX_MANIFEST_SIZE, parse_manifest
from ember.registry.server import routes as r
from ember.registry.server.config import ServerConfig
from ember.registry.server.errors import ApiError, OrgLimitReached
from ember.registry.server.gc import purge
from ember.registry.server.metadata import Quota, RegistryMetadata
from ember.registry.server.names import qualify, unqualify, valid_repo_name
from ember.registry.server.protocol import (
    accepts,
    challenge,
    content_length,
    page_size,
    parse_content_range,
    parse_range,
)
from ember.registry.server.references import describe_manifest
from ember.registry.server.responses import API_VERSION, BlobResponse, error_response
from ember.registry.server.revocations import Revocations
from ember.registry.server.storage import Allowance, BlobStorage, range_header, touch
from ember.registry.server.tokens import (
    TOKEN_TTL,
    Grant,
    InvalidToken,
    decode_token,
    encode_token,
    grant_for,
    is_api_token,
    parse_scopes,
)
from ember.registry.server.uploadstate import (
    UPLOAD_TTL,
    InvalidUploadState,
    UploadState,
    sign_state,
    verify_state,
)
from ember.store.errors import BlobNotFound

log = logging.getLogger("ember.registry")

T = TypeVar("T")
#: chunk size clients should use for chunked uploads (advertised, not enforced)
CHUNK_MIN_LENGTH = 1 << 20
#: body bytes of a refused upload chunk read and dropped so the client sees the answer
QUOTA_DRAIN_LIMIT = 64 << 20
#: how far ahead a streamed upload body (no Content-Length) reserves room under its
#: organization's quota, at least: as far as the session's size beyond that (so a body
#: of N bytes takes about log2(N / QUOTA_STEP) reservations, each a database write and
#: a sum over the organization's content), never more than a quarter of what is left
QUOTA_STEP = 8 << 20
#: how long a resolved API token is trusted before the database is asked again (its
#: revocation is seen sooner or as soon: see revocations.py)
_TOKEN_CACHE_SECONDS = 5.0


class RegistryApp:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.meta = RegistryMetadata(config.db_url)
        self.storage = BlobStorage(config.root)
        self._inline_reads = self.meta.db.engine.dialect.name == "sqlite"
        self._token_key = config.token_key
        self._upload_key = config.upload_key
        self._token_cache: dict[str, tuple[float, tuple[str, str, frozenset[str]] | None]] = {}
        self._revocations = Revocations()
        self._purging: asyncio.Task[None] | None = None

    # -- ASGI entry ----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            raw = scope.get("raw_path") or scope["path"].encode()
            raw = raw.split(b"?", 1)[0]
            if raw == b"/token":
                response = await self._token(request)
            elif raw == b"/v2" or raw.startswith(b"/v2/"):
                response = await self._v2(request, raw)
            else:
                raise ApiError("NAME_UNKNOWN", "not found", status=404)
        except ApiError as e:
            response = error_response(e)
        except ClientDisconnect:
            return
        except Exception:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            response = error_response(ApiError("UNKNOWN", "internal server error", status=500))
        await response(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # The first hop to the thread pool and the first queries cost ~20 ms
                # (measured on the first POST of a push); pay them before serving.
                await run_in_threadpool(self.meta.warm_up)
                interval = self.config.limits.upload_purge_interval
                if interval > 0:
                    self._purging = asyncio.create_task(self._purge_every(interval))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._purging is not None:
                    self._purging.cancel()  # a purge under way finishes first (its thread)
                    await asyncio.gather(self._purging, return_exceptions=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _purge_every(self, interval: float) -> None:
        """Delete expired upload sessions and empty repositories at start and then every
        ``interval`` seconds (gc.purge: one process of the server at a time), in a worker
        thread: requests go on being served meanwhile."""
        while True:
            try:
                report = await run_in_threadpool(purge, self.meta, self.storage, interval)
            except Exception:
                log.exception("purging expired uploads failed; trying again in %g s", interval)
            else:
                if report is not None and (report.uploads.sessions or report.repositories):
                    log.info(
                        "purged %d expired upload sessions (%d bytes) and %d empty repositories",
                        report.uploads.sessions,
                        report.uploads.bytes,
                        report.repositories,
                    )
            await asyncio.sleep(interval)

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """A database write (or anything that may wait on a lock): in a worker thread."""
        return await run_in_threadpool(fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """A short read query.  SQLite in WAL mode never makes a reader wait, and one
        indexed lookup costs less than the hop to a thread (measured: bench/registry.py),
        so it runs on the event loop; other databases go through a thread."""
        if self._inline_reads:
            return fn(*args)
        return await run_in_threadpool(fn, *args)

    # -- authentication ------------------------------------------------------------

    def _realm(self, request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}/token"

    async def _resolve_api_token(self, secret: str) -> tuple[str, str, frozenset[str]] | None:
        now = time.monotonic()
        cached = self._token_cache.get(secret)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self._read(self.meta.resolve_token, secret)
        if len(self._token_cache) > 10000:
            self._token_cache.clear()
        self._token_cache[secret] = (now + _TOKEN_CACHE_SECONDS, found)
        return found

    def _credential(self, request: Request) -> tuple[str, str] | None:
        """("basic"|"bearer", secret) from the Authorization header."""
        header = request.headers.get("authorization")
        if not header:
            return None
        kind, _, value = header.partition(" ")
        kind, value = kind.lower(), value.strip()
        if kind == "bearer" and value:
            return "bearer", value
        if kind == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                # answered as a missing one is: the route's 401 and its challenge,
                # with the scope the request needs (RFC 9110 11.6.1)
                return None
            user, colon, password = decoded.partition(":")
            if not colon:  # RFC 7617: user-id ":" password; an empty header is none either
                return None
            return "basic", password
        return None

    async def _revoked(self, token_id: str) -> bool:
        """Whether ``token_id`` was revoked (as of at most REFRESH_S ago)."""
        if self._revocations.due():
            await self._read(self._revocations.refresh, self.meta.revoked_since)
        return token_id in self._revocations

    async def _api_grant(self, secret: str) -> Grant | None:
        found = await self._resolve_api_token(secret) if is_api_token(secret) else None
        if found is None:
            return None
        org, token_id, actions = found
        if await self._revoked(token_id):  # resolved (and cached) before its revocation
            return None
        return Grant(org, token_id, org_actions=actions)

    async def _authenticate(self, request: Request) -> tuple[Grant | None, bool]:
        """(grant, is_registry_token); raises 401 for credentials that are invalid."""
        cred = self._credential(request)
        if cred is None:
            return None, False
        kind, secret = cred
        if kind == "bearer" and not is_api_token(secret):
            try:
                issued = decode_token(self._token_key, secret, int(time.time()))
            except InvalidToken as e:
                raise ApiError(
                    "UNAUTHORIZED",
                    f"invalid token: {e}",
                    headers={"WWW-Authenticate": challenge(self._realm(request), error="invalid_token")},
                ) from None
            if await self._revoked(issued.subject):
                raise ApiError(
                    "UNAUTHORIZED",
                    "invalid token: the ember token it was issued for has been revoked",
                    headers={"WWW-Authenticate": challenge(self._realm(request), error="invalid_token")},
                )
            return issued, True
        grant = await self._api_grant(secret)
        if grant is None:
            raise ApiError(
                "UNAUTHORIZED",
                "unknown or revoked ember token",
                headers={"WWW-Authenticate": challenge(self._realm(request), error="invalid_token")},
            )
        return grant, False

    def _deny(
        self, request: Request, grant: Grant | None, jwt: bool, scope: str, message: str
    ) -> ApiError:
        if grant is None:
            return ApiError(
                "UNAUTHORIZED",
                "authentication required",
                headers={"WWW-Authenticate": challenge(self._realm(request), scope)},
            )
        if jwt:
            # 403, not Docker's 401: oras-py fetches a new token only after a 403, while
            # docker, podman and skopeo ask for every scope they need up front.  The
            # challenge still names the scope, so any client can get a wider token.
            return ApiError(
                "DENIED",
                message,
                headers={
                    "WWW-Authenticate": challenge(self._realm(request), scope, "insufficient_scope")
                },
            )
        return ApiError("DENIED", message)

    # -- /token --------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        params = request.query_params
        scopes_raw = params.getlist("scope")
        secret: str | None = None
        if request.method == "POST":
            form = parse_qs((await self._read_limited(request, 65536)).decode("latin-1"))
            if form.get("grant_type") != ["password"]:
                # OAuth2's own error shape (RFC 6749 5.2), as Docker's token spec answers
                return JSONResponse(
                    {"error": "unsupported_grant_type",
                     "error_description": "only grant_type=password is supported"},
                    status_code=400,
                )
            secret = (form.get("password") or [""])[0]
            scopes_raw = form.get("scope") or []
        elif request.method == "GET":
            cred = self._credential(request)
            secret = cred[1] if cred else None
        else:
            raise ApiError("UNSUPPORTED", "use GET or POST on /token")
        grant = await self._api_grant(secret) if secret else None
        if grant is None:
            raise ApiError(
                "UNAUTHORIZED",
                "unknown or revoked ember token" if secret
                else "an ember token is required (as the password of basic auth, or as a bearer token)",
                headers={"WWW-Authenticate": 'Basic realm="ember"'},
            )
        scoped = grant_for(grant.org, grant.subject, grant.org_actions, parse_scopes(scopes_raw))
        now = int(time.time())
        token = encode_token(self._token_key, scoped, now)
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return JSONResponse(
            {"token": token, "access_token": token, "expires_in": TOKEN_TTL, "issued_at": issued}
        )

    # -- /v2/ dispatch -----------------------------------------------------------------

    async def _v2(self, request: Request, raw: bytes) -> Response:
        route = r.parse_path(raw)  # refuses dot segments and encodings before auth
        grant, jwt = await self._authenticate(request)
        method = request.method
        if route.kind in (r.BASE, r.CATALOG) and method not in ("GET", "HEAD"):
            raise ApiError("UNSUPPORTED", f"{method} is not supported here")
        if route.kind == r.BASE:
            if grant is None:
                raise self._deny(request, None, False, "", "")
            return JSONResponse({}, headers=API_VERSION)
        if route.kind == r.CATALOG:
            # Any verified caller: the catalog shows only its own organization's
            # repositories, and clients (podman search) ask for a token without
            # the registry:catalog:* scope.
            if grant is None:
                raise self._deny(request, None, jwt, "registry:catalog:*", "")
            return await self._catalog(request, grant)
        full = qualify(grant.org, route.name) if grant else ""
        ctx = _Ctx(request, route, grant, jwt, full)
        handler = _HANDLERS.get((route.kind, method))
        if handler is None:
            if (route.kind, "GET") in _HANDLERS or route.kind in (r.UPLOAD_START, r.UPLOAD):
                raise ApiError("UNSUPPORTED", f"{method} is not supported here")
            raise ApiError("NAME_UNKNOWN", "not found", status=404)
        action, fn = handler
        self._require(ctx, action)
        return await fn(self, ctx)

    def _require(self, ctx: _Ctx, action: str) -> None:
        scope_actions = {"pull": "pull", "push": "pull,push", "delete": "delete"}[action]
        scope = f"repository:{ctx.route.name}:{scope_actions}"
        if ctx.grant is None or not ctx.grant.allows(ctx.full, action):
            raise self._deny(
                ctx.request, ctx.grant, ctx.jwt, scope, f"{action} access to {ctx.route.name!r} denied"
            )

    def _location(self, ctx: _Ctx, suffix: str) -> str:
        return f"/v2/{ctx.route.name}/{suffix}"

    # -- catalog and tags -------------------------------------------------------------

    async def _catalog(self, request: Request, grant: Grant) -> Response:
        n = page_size(request.query_params.get("n"))
        last = request.query_params.get("last")
        last_full = qualify(grant.org, last) if last and valid_repo_name(last) else None
        names = await self._read(self.meta.list_repos, grant.org, n, last_full)
        shown = [unqualify(grant.org, name) for name in names]
        headers = dict(API_VERSION)
        if shown and len(shown) == n:
            headers["Link"] = f'</v2/_catalog?n={n}&last={shown[-1]}>; rel="next"'
        return JSONResponse({"repositories": shown}, headers=headers)

    async def _tags(self, ctx: _Ctx) -> Response:
        params = ctx.request.query_params
        n = page_size(params.get("n"))
        last = params.get("last") or None
        tags = await self._read(self.meta.list_tags, ctx.full, n, last)
        if tags is None:
            raise ApiError("NAME_UNKNOWN", f"repository {ctx.route.name!r} is not known")
        headers = dict(API_VERSION)
        if tags and len(tags) == n:
            headers["Link"] = f'</v2/{ctx.route.name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
        return JSONResponse({"name": ctx.route.name, "tags": tags}, headers=headers)

    # -- manifests -------------------------------------------------------------------

    async def _get_manifest(self, ctx: _Ctx) -> Response:
        route = ctx.route
        if route.digest is not None:
            row = await self._read(self.meta.manifest, ctx.full, str(route.digest))
        else:
            row = await self._read(self.meta.tagged_manifest, ctx.full, route.tag)
        if row is None:
            raise ApiError("MANIFEST_UNKNOWN", f"manifest {route.reference!r} is not known")
        if not accepts(ctx.request.headers.getlist("accept"), row.media_type):
            raise ApiError(
                "MANIFEST_UNKNOWN",
                f"manifest {route.reference!r} is a {row.media_type}, which the request's Accept excludes",
            )
        headers = {
            **API_VERSION,
            "Content-Type": row.media_type,
            "Docker-Content-Digest": row.digest,
            "ETag": f'"{row.digest}"',
            "Content-Length": str(row.size),
        }
        if ctx.request.method == "HEAD":
            return Response(b"", headers=headers)
        try:
            body = self.storage.content.read_bytes(Digest.parse(row.digest))
        except BlobNotFound:  # collected by GC after the row was read
            raise ApiError("MANIFEST_UNKNOWN", f"manifest {route.reference!r} is not known") from None
        return Response(body, headers=headers)

    async def _read_limited(self, request: Request, limit: int) -> bytes:
        size = content_length(request.headers.get("content-length"))
        if size is not None and size > limit:
            raise ApiError("SIZE_INVALID", f"body is larger than {limit} bytes", status=413)
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise ApiError("SIZE_INVALID", f"body is larger than {limit} bytes", status=413)
        return bytes(buf)

    async def _put_manifest(self, ctx: _Ctx) -> Response:
        assert ctx.grant is not None
        route = ctx.route
        body = await self._read_limited(ctx.request, MAX_MANIFEST_SIZE)
        content_type = ctx.request.headers.get("content-type")
        algorithm = route.digest.algorithm if route.digest is not None else "sha256"
        digest = Digest.of(body, algorithm)
        if route.digest is not None and route.digest != digest:
            raise ApiError(
                "DIGEST_INVALID", f"manifest body has digest {digest}, not {route.digest} as in the URL"
            )
        try:
            new = describe_manifest(parse_manifest(body, content_type), digest, len(body))
        except FormatError as e:
            raise ApiError("MANIFEST_INVALID", str(e)) from None
        # Under the shared GC lock from the check to the commit: a sweep cannot drop a
        # link or a child manifest between "it is there" and the rows that use it.
        async with self.storage.publishing():
            missing, wrong_size = await self._read(
                self.meta.check_references, ctx.full, new.blobs, new.children
            )
            if missing:
                raise ApiError(
                    "MANIFEST_BLOB_UNKNOWN",
                    "manifest references content that is not in this repository: "
                    + ", ".join(missing[:5]),
                    detail={"missing": missing},
                )
            if wrong_size:
                raise ApiError(
                    "MANIFEST_INVALID",
                    "descriptor sizes do not match the content in this repository: "
                    + ", ".join(wrong_size[:5]),
                    detail={"size_mismatch": wrong_size},
                )
            # checked before its bytes are written (a refused manifest leaves no file), and
            # again with its rows, atomically (see _quota_org)
            quota = await self._quota(ctx, digest)
            if quota is not None and not quota.allows(new.size):
                raise self._over_quota(ctx, quota, str(new.size), "manifest")
            repo_id = await self._ensure_repo(ctx)
            # bytes first (atomic, content-addressed), then the rows that make them visible
            await run_in_threadpool(self.storage.content.put_bytes, body, digest)
            touch(self.storage.blob_path(digest))
            refused = await self._db(
                self.meta.put_manifest, repo_id, new, route.tag, self._quota_org(ctx, quota)
            )
            if refused is not None:
                raise self._over_quota(ctx, refused, str(new.size), "manifest")
        headers = {
            **API_VERSION,
            "Location": self._location(ctx, f"manifests/{digest}"),
            "Docker-Content-Digest": str(digest),
        }
        if new.subject is not None:
            headers["OCI-Subject"] = new.subject
        return Response(b"", status_code=201, headers=headers)

    async def _delete_manifest(self, ctx: _Ctx) -> Response:
        route = ctx.route
        if route.digest is not None:
            done = await self._db(self.meta.delete_manifest, ctx.full, str(route.digest))
        else:
            done = await self._db(self.meta.delete_tag, ctx.full, route.tag)
        if not done:
            raise ApiError("MANIFEST_UNKNOWN", f"manifest {route.reference!r} is not known")
        return Response(b"", status_code=202, headers=API_VERSION)

    async def _referrers(self, ctx: _Ctx) -> Response:
        artifact_type = ctx.request.query_params.get("artifactType") or None
        assert ctx.route.digest is not None
        refs = await self._read(self.meta.referrers, ctx.full, str(ctx.route.digest), artifact_type)
        manifests = []
        for ref in refs:
            desc: dict[str, Any] = {"mediaType": ref.media_type, "digest": ref.digest, "size": ref.size}
            if ref.artifact_type:
                desc["artifactType"] = ref.artifact_type
            if ref.annotations:
                desc["annotations"] = ref.annotations
            manifests.append(desc)
        headers = {**API_VERSION}
        if artifact_type is not None:
            headers["OCI-Filters-Applied"] = "artifactType"
        body = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests})
        return Response(body, headers=headers, media_type=mt.OCI_INDEX)

    # -- blobs -----------------------------------------------------------------------

    async def _get_blob(self, ctx: _Ctx) -> Response:
        digest = ctx.route.digest
        assert digest is not None
        size = await self._read(self.meta.blob_size, ctx.full, str(digest))
        if size is None:
            raise ApiError("BLOB_UNKNOWN", f"blob {digest} is not in repository {ctx.route.name!r}")
        path = self.storage.blob_path(digest)
        headers = {
            **API_VERSION,
            "Docker-Content-Digest": str(digest),
            "ETag": f'"{digest}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Cache-Control": "max-age=31536000",
        }
        span = None
        range_value = ctx.request.headers.get("range")
        if range_value:
            span = parse_range(range_value, size)
        if ctx.request.method == "HEAD":
            # clients skip uploading what HEAD says exists: say so only if the bytes are there
            if not path.is_file():
                raise ApiError("BLOB_UNKNOWN", f"blob {digest} is not available")
            headers["Content-Length"] = str(size)
            return Response(b"", headers=headers)
        return BlobResponse(str(path), size, span, headers)

    async def _delete_blob(self, ctx: _Ctx) -> Response:
        assert ctx.route.digest is not None
        if not await self._db(self.meta.unlink_blob, ctx.full, str(ctx.route.digest)):
            raise ApiError("BLOB_UNKNOWN", f"blob {ctx.route.digest} is not in this repository")
        return Response(b"", status_code=202, headers=API_VERSION)

    # -- uploads -----------------------------------------------------------------------

    def _upload_headers(self, ctx: _Ctx, session: str, size: int, expires: int) -> dict[str, str]:
        """``expires``: the session's, fixed when it started: a URL outlives neither the
        session's row nor its place in the quota (both end then)."""
        assert ctx.grant is not None
        state = UploadState(ctx.grant.org, ctx.full, session, size, expires)
        token = sign_state(self._upload_key, state)
        return {
            **API_VERSION,
            "Location": self._location(ctx, f"blobs/uploads/{session}?_state={token}"),
            "Range": range_header(size),
            "Docker-Upload-UUID": session,
            "OCI-Chunk-Min-Length": str(CHUNK_MIN_LENGTH),
        }

    async def _blob_created(self, ctx: _Ctx, digest: Digest) -> Response:
        return Response(
            b"",
            status_code=201,
            headers={
                **API_VERSION,
                "Location": self._location(ctx, f"blobs/{digest}"),
                "Docker-Content-Digest": str(digest),
            },
        )

    async def _quota(
        self, ctx: _Ctx, digest: Digest | None = None, session: str | None = None
    ) -> Quota | None:
        """The caller's organization's quota and use (None: it has none); see
        RegistryMetadata.quota."""
        assert ctx.grant is not None
        return await self._read(
            self.meta.quota, ctx.grant.org, str(digest) if digest else None, session
        )

    def _quota_org(self, ctx: _Ctx, quota: Quota | None) -> str | None:
        """The organization whose quota a write must check again, in its own transaction
        (a check read before it is not a reservation): None when it had no quota."""
        assert ctx.grant is not None
        return None if quota is None else ctx.grant.org

    async def _exceeded(
        self, ctx: _Ctx, size: int, digest: Digest | None = None, session: str | None = None
    ) -> Quota | None:
        """The caller's organization's quota when ``size`` more bytes (a blob ``digest`` it
        holds already costs none; upload ``session``'s own bytes left out of the use)
        would pass it; None when they fit."""
        quota = await self._quota(ctx, digest, session)
        return None if quota is None or quota.allows(size) else quota

    async def _bounded(self, ctx: _Ctx, digest: Digest | None = None) -> bool:
        """Whether the caller's uploads must fit a quota (see RegistryMetadata.bounded)."""
        assert ctx.grant is not None
        return await self._read(self.meta.bounded, ctx.grant.org, str(digest) if digest else None)

    async def _allowance(
        self, ctx: _Ctx, session: str, digest: Digest | None = None, expected: int | None = None
    ) -> Allowance | None:
        """What upload ``session`` may grow into while a body streams (None: no bound).
        When the organization holds ``digest`` the bytes cost nothing, but they may not
        outgrow that blob (then they are not it); checked again when published.
        ``expected``: the size the body will take it to, if known."""
        if not await self._bounded(ctx):
            return None
        if digest is not None:
            assert ctx.grant is not None
            held = await self._read(self.meta.held_size, ctx.grant.org, str(digest))
            if held is not None:
                return _HeldBlob(digest, held)
        return _Room(self, ctx, session, expected)

    async def _append_within_quota(
        self, ctx: _Ctx, session: str, start: int | None, limit: int | None, room: Allowance | None
    ) -> int:
        """storage.append within the quota's room; past it the session is dropped and the
        client told the quota's figures (403 DENIED)."""
        try:
            return await self.storage.append(session, ctx.request.stream(), start, limit, room)
        except ApiError as e:
            if e.code == "DENIED" and room is not None:
                await self._drop_session(session)
            raise

    async def _check_quota(
        self, ctx: _Ctx, size: int, digest: Digest | None = None, session: str | None = None
    ) -> None:
        """403 DENIED when ``size`` bytes do not fit the organization's quota (``session``:
        the upload they are for, whose bytes so far are part of ``size``); that session,
        if any, is dropped (its bytes would only take room)."""
        quota = await self._exceeded(ctx, size, digest, session)
        if quota is None:
            return
        if session is not None:
            await self._drop_session(session)
        raise self._over_quota(ctx, quota, str(size) if size else None)

    async def _hold(
        self, ctx: _Ctx, session: str, size: int, digest: Digest | None = None
    ) -> Quota | None:
        """Reserve ``size`` bytes, the whole of upload ``session``, under the quota (free
        if the organization holds ``digest``), in one transaction: a reservation, not a
        check, so two uploads finishing at once cannot both take the last room.  None
        when they fit; else the session is dropped and the Quota that refused returned."""
        assert ctx.grant is not None
        if not await self._bounded(ctx, digest):
            return None  # without a database write: the common case, no quota
        got = await self._db(
            self.meta.reserve_upload, ctx.grant.org, session, size, 0, str(digest) if digest else None
        )
        if not isinstance(got, Quota):
            return None
        await self._drop_session(session)
        return got

    def _over_quota(
        self, ctx: _Ctx, quota: Quota, needs: str | None, what: str = "upload"
    ) -> ApiError:
        """``needs``: what the upload (or manifest) would add, or None when nothing fits
        any more."""
        assert ctx.grant is not None
        parts = [f"{quota.used} of {quota.limit} bytes used"]
        if quota.uploads:  # room the client can free: by finishing or cancelling them
            parts[0] += f" ({quota.uploads} of them by unfinished uploads)"
        if needs is not None:
            parts.append(f"this {what} needs {needs}")
        return ApiError(
            "DENIED", f"organization {ctx.grant.org} is over its storage quota: {', '.join(parts)}"
        )

    async def _drop_session(self, session: str) -> None:
        """An upload session and its row (unless a request is appending to it meanwhile)."""
        if self.storage.drop_session_if_idle(session):
            await self._db(self.meta.delete_upload, session)

    async def _try_mount(self, ctx: _Ctx, mount: str, source: str) -> Digest | None:
        """Link ``mount`` from ``source`` if the caller may pull it there; else None.

        Every refusal looks the same to the client (a plain upload session follows),
        so a mount reveals nothing about other repositories.
        """
        assert ctx.grant is not None
        if not valid_repo_name(source):
            return None
        try:
            digest = Digest.parse(mount)
        except FormatError:
            return None
        source_full = qualify(ctx.grant.org, source)
        if not ctx.grant.allows(source_full, "pull"):
            return None
        async with self.storage.publishing():
            size = await self._read(self.meta.blob_size, source_full, str(digest))
            path = self.storage.blob_path(digest)
            if size is None or not path.exists():
                return None
            # past the quota: the upload that follows is refused with the reason
            quota = await self._quota(ctx, digest)
            if quota is not None and not quota.allows(size):
                return None
            try:
                repo_id = await self._ensure_repo(ctx)
            except ApiError:  # one repository too many: the upload that follows says so
                return None
            touch(path)
            refused = await self._db(
                self.meta.link_blob, repo_id, str(digest), size, self._quota_org(ctx, quota)
            )
            if refused is not None:
                return None
        return digest

    async def _start_upload(self, ctx: _Ctx) -> Response:
        assert ctx.grant is not None
        params = ctx.request.query_params
        mount, source = params.get("mount"), params.get("from")
        if mount and source:
            mounted = await self._try_mount(ctx, mount, source)
            if mounted is not None:
                return await self._blob_created(ctx, mounted)
        await self._check_quota(ctx, 0)
        session = uuid.uuid4().hex
        expires = int(time.time()) + UPLOAD_TTL
        repo_id = await self._open_session(ctx, session, expires)
        digest_param = params.get("digest")
        if digest_param is not None:
            # monolithic upload: POST ?digest= with the whole blob as the body
            try:
                digest = _parse_digest(digest_param)
                length = content_length(ctx.request.headers.get("content-length"))
                room = await self._allowance(ctx, session, digest, length)
                await self._append_within_quota(ctx, session, 0, None, room)
                return await self._finish(ctx, repo_id, session, digest)
            except ApiError:
                # the client never got this session's URL: nothing can resume or end it
                await self._drop_session(session)
                raise
        return Response(
            b"", status_code=202, headers=self._upload_headers(ctx, session, 0, expires)
        )

    async def _open_session(self, ctx: _Ctx, session: str, expires: int) -> int:
        """A new upload session: its row (with its repository, if new), then its file;
        refused when the organization has as many open sessions, or repositories, as
        it may.  The repository's id."""
        assert ctx.grant is not None
        limits = self.config.limits
        try:
            repo_id = await self._db(
                self.meta.create_upload, ctx.grant.org, ctx.full, session, expires,
                limits.max_uploads, limits.max_repositories,
            )  # fmt: skip
        except OrgLimitReached as e:
            raise _limit_reached(e) from None
        # after the row: a file is never without its session's row (gc._stale_uploads)
        try:
            self.storage.create_session(session)
        except OSError:
            await self._db(self.meta.delete_upload, session)
            raise
        return repo_id

    async def _ensure_repo(self, ctx: _Ctx) -> int:
        """The id of the request's repository, created if need be: refused (403) when
        the organization has as many repositories as it may."""
        assert ctx.grant is not None
        try:
            return await self._db(
                self.meta.ensure_repo, ctx.grant.org, ctx.full, self.config.limits.max_repositories
            )
        except OrgLimitReached as e:
            raise _limit_reached(e) from None

    def _session(self, ctx: _Ctx) -> UploadState:
        """The verified upload state of this request, bound to this org, repo and session."""
        assert ctx.grant is not None and ctx.route.upload_id is not None
        unknown = ApiError("BLOB_UPLOAD_UNKNOWN", "upload session is unknown or its URL is not valid")
        text = ctx.request.query_params.get("_state")
        if not text:
            raise unknown
        try:
            state = verify_state(self._upload_key, text, int(time.time()))
        except InvalidUploadState:
            raise unknown from None
        if (state.org, state.repo, state.session) != (ctx.grant.org, ctx.full, ctx.route.upload_id):
            raise unknown
        if self.storage.session_size(state.session) is None:
            raise unknown
        return state

    def _chunk_range(self, ctx: _Ctx, state: UploadState) -> tuple[int, int | None]:
        """Where the body must start (Content-Range if given, else the URL's offset) and
        how long Content-Range says it is (None without one)."""
        value = ctx.request.headers.get("content-range")
        if value is None:
            return state.offset, None
        start, end = parse_content_range(value)
        length = content_length(ctx.request.headers.get("content-length"))
        if length is not None and length != end - start + 1:
            raise ApiError(
                "BLOB_UPLOAD_INVALID",
                f"Content-Range {value!r} does not match Content-Length {length}",
                status=416,
            )
        return start, end - start + 1

    def _out_of_order(self, ctx: _Ctx, state: UploadState, e: ApiError) -> ApiError:
        """A 416 tells the client where the upload stands (Range, Location)."""
        if e.status == 416:
            current = self.storage.session_size(state.session) or 0
            e.headers.update(self._upload_headers(ctx, state.session, current, state.expires))
        return e

    async def _append(
        self,
        ctx: _Ctx,
        state: UploadState,
        start: int,
        limit: int | None,
        digest: Digest | None = None,
    ) -> int:
        """Append the request's body as a chunk starting at ``start`` (``limit``: its
        length by Content-Range), within the quota's room (a final PUT's ``digest``,
        if the organization holds it, costs nothing)."""
        length = content_length(ctx.request.headers.get("content-length"))
        known = length if length is not None else limit
        expected = None if known is None else start + known
        room = await self._allowance(ctx, state.session, digest, expected)
        try:
            return await self._append_within_quota(ctx, state.session, start, limit, room)
        except ApiError as e:
            raise self._out_of_order(ctx, state, e) from None

    async def _patch_upload(self, ctx: _Ctx) -> Response:
        state = self._session(ctx)
        start, limit = self._chunk_range(ctx, state)
        length = content_length(ctx.request.headers.get("content-length"))
        if length is not None:  # refused before a byte is written
            current = self.storage.session_size(state.session) or 0
            if start != current:
                # a chunk out of order is a 416 that keeps the session, quota or not
                # (append checks again under the session's lock)
                await _discard(ctx.request, QUOTA_DRAIN_LIMIT)
                raise self._out_of_order(ctx, state, ApiError(
                    "BLOB_UPLOAD_INVALID",
                    f"chunk starts at {start} but the upload has {current} bytes",
                    status=416,
                ))
            try:
                await self._check_quota(ctx, start + length, session=state.session)
            except ApiError:
                # read (not kept) what the client sends anyway, up to a bound, so that it
                # gets to read the refusal rather than a reset connection
                await _discard(ctx.request, QUOTA_DRAIN_LIMIT)
                raise
        size = await self._append(ctx, state, start, limit)
        headers = self._upload_headers(ctx, state.session, size, state.expires)
        return Response(b"", status_code=202, headers=headers)

    async def _put_upload(self, ctx: _Ctx) -> Response:
        assert ctx.grant is not None
        state = self._session(ctx)
        digest = _parse_digest(ctx.request.query_params.get("digest"))
        # docker sends the last PATCH's Location with an empty body: nothing to append
        has_body = bool(content_length(ctx.request.headers.get("content-length"))) or (
            "chunked" in ctx.request.headers.get("transfer-encoding", "").lower()
        )
        if has_body or ctx.request.headers.get("content-range"):
            start, limit = self._chunk_range(ctx, state)
            await self._append(ctx, state, start, limit, digest)
        return await self._finish(ctx, None, state.session, digest)

    async def _finish(
        self, ctx: _Ctx, repo_id: int | None, session: str, digest: Digest
    ) -> Response:
        """Publish upload ``session`` as ``digest`` into the request's repository:
        ``repo_id`` if known, else looked up under the GC lock (a gc or purge deletes a
        repository left with nothing only under the exclusive one)."""
        size = self.storage.session_size(session) or 0
        refused = await self._hold(ctx, session, size, digest)
        if refused is not None:
            raise self._over_quota(ctx, refused, str(size) if size else None)
        async with self.storage.publishing():
            if repo_id is None:
                repo_id = await self._ensure_repo(ctx)
            try:
                size = await run_in_threadpool(self.storage.publish, session, digest)
            except ApiError as e:
                # The reservation above let the bytes through for free if the organization
                # holds ``digest``; they are not that blob, so they must fit like any
                # others, or go (kept, they would be a way to store anything past the quota).
                if e.code == "DIGEST_INVALID":
                    await self._hold(ctx, session, size)
                raise
            # what the session held becomes the blob's, in one transaction
            await self._db(self.meta.link_upload, repo_id, session, str(digest), size)
        return await self._blob_created(ctx, digest)

    async def _upload_status(self, ctx: _Ctx) -> Response:
        state = self._session(ctx)
        size = self.storage.session_size(state.session) or 0
        headers = self._upload_headers(ctx, state.session, size, state.expires)
        return Response(b"", status_code=204, headers=headers)

    async def _cancel_upload(self, ctx: _Ctx) -> Response:
        state = self._session(ctx)
        self.storage.drop_session(state.session)  # 409 while another request uses it
        await self._db(self.meta.delete_upload, state.session)
        return Response(b"", status_code=204, headers=API_VERSION)


async def _discard(request: Request, limit: int) -> None:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            return


class _Room:
    """An upload session's room under its organization's quota (a storage.Allowance),
    reserved in the database as the body arrives: the organization's open sessions
    together never hold more than its quota leaves, however many stream at once."""

    def __init__(self, app: RegistryApp, ctx: _Ctx, session: str, expected: int | None):
        assert ctx.grant is not None
        self.app = app
        self.ctx = ctx
        self.org = ctx.grant.org
        self.session = session
        self.expected = expected
        self.reserved = False

    async def grow(self, size: int) -> int:
        # A body of known length reserves all of it at once (refused before a byte of
        # it is written); a streamed one ahead of what it needs (see QUOTA_STEP).
        need = max(size, self.expected or 0)
        ahead = 0 if self.expected is not None else max(QUOTA_STEP, size)
        got = await self.app._db(self.app.meta.reserve_upload, self.org, self.session, need, ahead)
        if isinstance(got, Quota):
            raise self.app._over_quota(self.ctx, got, f"more than the {got.room} bytes left")
        self.reserved = True
        return got

    async def settle(self, size: int) -> None:
        if self.reserved:  # give back what was reserved and not used
            await self.app._db(self.app.meta.settle_upload, self.session, size)


class _HeldBlob:
    """The room of an upload that claims to be a blob its organization holds already
    (free under the quota): that blob's size, no more.  A body that grows past it cannot
    be the blob; unbounded, it could put any amount past the quota on disk while it
    streamed, to be refused only when its digest was checked."""

    def __init__(self, digest: Digest, size: int) -> None:
        self.digest = digest
        self.size = size

    async def grow(self, size: int) -> int:
        if size > self.size:
            raise ApiError(
                "DIGEST_INVALID",
                f"the upload is larger than {self.digest}, which has {self.size} bytes",
            )
        return self.size

    async def settle(self, size: int) -> None:
        pass  # nothing was reserved


class _Ctx:
    __slots__ = ("request", "route", "grant", "jwt", "full")

    def __init__(self, request: Request, route: r.Route, grant: Grant | None, jwt: bool, full: str):
        self.request = request
        self.route = route
        self.grant = grant
        self.jwt = jwt
        self.full = full


Handler = Callable[[RegistryApp, _Ctx], Awaitable[Response]]

_HANDLERS: dict[tuple[str, str], tuple[str, Handler]] = {
    (r.TAGS, "GET"): ("pull", RegistryApp._tags),
    (r.MANIFEST, "GET"): ("pull", RegistryApp._get_manifest),
    (r.MANIFEST, "HEAD"): ("pull", RegistryApp._get_manifest),
    (r.MANIFEST, "PUT"): ("push", RegistryApp._put_manifest),
    (r.MANIFEST, "DELETE"): ("delete", RegistryApp._delete_manifest),
    (r.REFERRERS, "GET"): ("pull", RegistryApp._referrers),
    (r.BLOB, "GET"): ("pull", RegistryApp._get_blob),
    (r.BLOB, "HEAD"): ("pull", RegistryApp._get_blob),
    (r.BLOB, "DELETE"): ("delete", RegistryApp._delete_blob),
    (r.UPLOAD_START, "POST"): ("push", RegistryApp._start_upload),
    (r.UPLOAD, "GET"): ("push", RegistryApp._upload_status),
    (r.UPLOAD, "PATCH"): ("push", RegistryApp._patch_upload),
    (r.UPLOAD, "PUT"): ("push", RegistryApp._put_upload),
    (r.UPLOAD, "DELETE"): ("push", RegistryApp._cancel_upload),
}


def _limit_reached(e: OrgLimitReached) -> ApiError:
    """The answer to a request that wanted one upload session (or repository) more than
    its organization may have.  Too many open sessions is 429 TOOMANYREQUESTS, what
    Distribution's error codes have for it: a session counts for an hour only, and
    containers/image may retry it later; docker, like for 403, shows the message.  Too many
    repositories is 403 DENIED: that lasts until some are emptied."""
    if e.what == "uploads":
        later = "later" if e.retry_after is None else f"in {_duration(e.retry_after)}"
        return ApiError(
            "TOOMANYREQUESTS",
            f"organization {e.org} has opened {e.limit} uploads in the last hour that are "
            f"not finished, the most it may have: finish or cancel some, or try again {later} "
            "(an upload counts for an hour after it started)",
            headers={} if e.retry_after is None else {"Retry-After": str(e.retry_after)},
        )
    return ApiError(
        "DENIED",
        f"organization {e.org} has {e.limit} repositories, the most it may have: push into "
        "one of them, or delete the manifests and blobs of one it no longer needs (a "
        "repository left with nothing is removed an hour after it was made)",
    )


def _duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} s"
    return f"{math.ceil(seconds / 60)} min"


def _parse_digest(value: str | None) -> Digest:
    if not value:
        raise ApiError("DIGEST_INVALID", "the digest= query parameter is required")
    try:
        return Digest.parse(value)
    except FormatError as e:
        raise ApiError("DIGEST_INVALID", str(e)) from None
