"""The registry's ASGI application: ``/v2/`` (distribution API) and ``/token``.

Request order, for every ``/v2/`` request: parse and sanity-check the raw path
(dot segments, encodings: refused before anything else), authenticate, rewrite
the repository name into the caller's organization, check the action on that
qualified name, then act.  Every blob read and mount source is checked against
the links of the repository named in the request.

This module routes requests and serves the reads (catalog, tags, manifests,
referrers, blobs) and manifest writes; credentials and ``/token`` are auth.py's,
blob uploads uploads.py's, the organization's quota and limits quota.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ember.oci import mediatypes as mt
from ember.oci.digest import Digest
from ember.oci.errors import FormatError
from ember.oci.manifest import MAX_MANIFEST_SIZE, parse_manifest, valid_media_type
from ember.registry.server import routes as r
from ember.registry.server.auth import Authenticator, deny, require
from ember.registry.server.config import ServerConfig
from ember.registry.server.context import RequestContext, read_limited
from ember.registry.server.dbcalls import DbCalls
from ember.registry.server.errors import ApiError, method_not_allowed
from ember.registry.server.gc import purge, repairs_said
from ember.registry.server.metadata import RegistryMetadata
from ember.registry.server.names import qualify, unqualify, valid_repo_name
from ember.registry.server.protocol import accepts, page_size, parse_range
from ember.registry.server.quota import Quotas, over_quota, quota_org
from ember.registry.server.references import describe_manifest
from ember.registry.server.responses import API_VERSION, BlobResponse, error_response
from ember.registry.server.storage import BlobStorage, touch
from ember.registry.server.tokens import Grant
from ember.registry.server.uploads import Uploads
from ember.store.errors import BlobNotFound, DatabaseBusy

log = logging.getLogger("ember.registry")

#: a /v2/ handler, given its request's context
Handler = Callable[[RequestContext], Awaitable[Response]]


class RegistryApp:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.meta = RegistryMetadata(config.db_url)
        self.storage = BlobStorage(config.root)
        self.db = DbCalls(self.meta)
        self.auth = Authenticator(self.meta, self.db, config.token_key)
        self.quotas = Quotas(self.meta, self.db, config.limits)
        self.uploads = Uploads(
            self.meta, self.storage, self.db, self.quotas, config.limits, config.upload_key
        )
        self._purging: asyncio.Task[None] | None = None
        #: (route kind, method) -> (the action it needs, its handler)
        self._handlers: dict[tuple[str, str], tuple[str, Handler]] = {
            (r.TAGS, "GET"): ("pull", self._tags),
            (r.MANIFEST, "GET"): ("pull", self._get_manifest),
            (r.MANIFEST, "HEAD"): ("pull", self._get_manifest),
            (r.MANIFEST, "PUT"): ("push", self._put_manifest),
            (r.MANIFEST, "DELETE"): ("delete", self._delete_manifest),
            (r.REFERRERS, "GET"): ("pull", self._referrers),
            (r.BLOB, "GET"): ("pull", self._get_blob),
            (r.BLOB, "HEAD"): ("pull", self._get_blob),
            (r.BLOB, "DELETE"): ("delete", self._delete_blob),
            (r.UPLOAD_START, "POST"): ("push", self.uploads.start),
            (r.UPLOAD, "GET"): ("push", self.uploads.status),
            (r.UPLOAD, "PATCH"): ("push", self.uploads.patch),
            (r.UPLOAD, "PUT"): ("push", self.uploads.put),
            (r.UPLOAD, "DELETE"): ("push", self.uploads.cancel),
        }

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
                response = await self.auth.token(request)
            elif raw == b"/v2" or raw.startswith(b"/v2/"):
                response = await self._v2(request, raw)
            else:
                raise ApiError("NAME_UNKNOWN", "not found", status=404)
        except ApiError as e:
            response = error_response(e)
        except ClientDisconnect:
            return
        except (DatabaseBusy, PoolTimeout) as e:
            # another writer held the database (or its connections) past the wait: the
            # request may pass when tried again, as a 503 tells clients
            log.warning("%s %s: %s", scope.get("method"), scope.get("path"), e)
            response = error_response(ApiError(
                "UNAVAILABLE", "the registry's database is busy: try again",
                status=503, headers={"Retry-After": "1"},
            ))  # fmt: skip
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
        """Delete expired upload sessions and empty repositories, and what killed
        requests left (gc.purge), at start and then every ``interval`` seconds (one
        process of the server at a time), in a worker thread: requests go on being
        served meanwhile."""
        at_start = True
        while True:
            try:
                report = await run_in_threadpool(
                    purge, self.meta, self.storage, interval, at_start=at_start
                )
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
                if report is not None and (
                    report.dead_uploads or report.settled_uploads or report.ingests
                ):
                    log.info("recovered from interrupted requests: %s", repairs_said(report))
            at_start = False
            await asyncio.sleep(interval)

    # -- /v2/ dispatch -----------------------------------------------------------------

    async def _v2(self, request: Request, raw: bytes) -> Response:
        route = r.parse_path(raw)  # refuses dot segments and encodings before auth
        grant, jwt = await self.auth.authenticate(request)
        method = request.method
        if route.kind in (r.BASE, r.CATALOG) and method not in ("GET", "HEAD"):
            raise method_not_allowed(method, ("GET", "HEAD"))
        if route.kind == r.BASE:
            if grant is None:
                raise deny(request, None, False, "", "")
            return JSONResponse({}, headers=API_VERSION)
        if route.kind == r.CATALOG:
            # Any verified caller: the catalog shows only its own organization's
            # repositories, and clients (podman search) ask for a token without
            # the registry:catalog:* scope.
            if grant is None:
                raise deny(request, None, jwt, "registry:catalog:*", "")
            return await self._catalog(request, grant)
        full = qualify(grant.org, route.name) if grant else ""
        ctx = RequestContext(request, route, grant, jwt, full)
        handler = self._handlers.get((route.kind, method))
        if handler is None:
            allowed = [m for kind, m in self._handlers if kind == route.kind]
            if allowed:
                raise method_not_allowed(method, allowed)
            raise ApiError("NAME_UNKNOWN", "not found", status=404)
        action, fn = handler
        require(ctx, action)
        return await fn(ctx)

    # -- catalog and tags -------------------------------------------------------------

    async def _catalog(self, request: Request, grant: Grant) -> Response:
        n = page_size(request.query_params.get("n"))
        last = request.query_params.get("last")
        last_full = qualify(grant.org, last) if last and valid_repo_name(last) else None
        names = await self.db.read(self.meta.list_repos, grant.org, n, last_full)
        shown = [unqualify(grant.org, name) for name in names]
        headers = dict(API_VERSION)
        if shown and len(shown) == n:
            headers["Link"] = f'</v2/_catalog?n={n}&last={shown[-1]}>; rel="next"'
        return JSONResponse({"repositories": shown}, headers=headers)

    async def _tags(self, ctx: RequestContext) -> Response:
        params = ctx.request.query_params
        n = page_size(params.get("n"))
        last = params.get("last") or None
        if last is not None:
            # No tag holds a NUL, so the tags after "a\0b" are those after "a"; PostgreSQL
            # refuses a NUL in text (a 500 for a client's mistake).
            last = last.split("\x00", 1)[0] or None
        tags = await self.db.read(self.meta.list_tags, ctx.full, n, last)
        if tags is None:
            raise ApiError("NAME_UNKNOWN", f"repository {ctx.route.name!r} is not known")
        headers = dict(API_VERSION)
        if tags and len(tags) == n:
            headers["Link"] = f'</v2/{ctx.route.name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
        return JSONResponse({"name": ctx.route.name, "tags": tags}, headers=headers)

    # -- manifests -------------------------------------------------------------------

    async def _get_manifest(self, ctx: RequestContext) -> Response:
        route = ctx.route
        if route.digest is not None:
            row = await self.db.read(self.meta.manifest, ctx.full, str(route.digest))
        else:
            row = await self.db.read(self.meta.tagged_manifest, ctx.full, route.tag)
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

    async def _put_manifest(self, ctx: RequestContext) -> Response:
        assert ctx.grant is not None
        route = ctx.route
        body = await read_limited(ctx.request, MAX_MANIFEST_SIZE)
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
            missing, wrong_size = await self.db.read(
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
            # again with its rows, atomically (see quota.quota_org)
            quota = await self.quotas.quota(ctx.org, digest)
            if quota is not None and not quota.allows(new.size):
                raise over_quota(ctx.org, quota, str(new.size), "manifest")
            repo_id = await self.quotas.ensure_repo(ctx.org, ctx.full)
            # bytes first (atomic, content-addressed), then the rows that make them visible
            await run_in_threadpool(self.storage.content.put_bytes, body, digest)
            touch(self.storage.blob_path(digest))
            refused = await self.db.write(
                self.meta.put_manifest, repo_id, new, route.tag, quota_org(ctx.org, quota)
            )
            if refused is not None:
                raise over_quota(ctx.org, refused, str(new.size), "manifest")
        headers = {
            **API_VERSION,
            "Location": ctx.location(f"manifests/{digest}"),
            "Docker-Content-Digest": str(digest),
        }
        if new.subject is not None:
            headers["OCI-Subject"] = new.subject
        return Response(b"", status_code=201, headers=headers)

    async def _delete_manifest(self, ctx: RequestContext) -> Response:
        route = ctx.route
        if route.digest is not None:
            done = await self.db.write(self.meta.delete_manifest, ctx.full, str(route.digest))
        else:
            done = await self.db.write(self.meta.delete_tag, ctx.full, route.tag)
        if not done:
            raise ApiError("MANIFEST_UNKNOWN", f"manifest {route.reference!r} is not known")
        return Response(b"", status_code=202, headers=API_VERSION)

    async def _referrers(self, ctx: RequestContext) -> Response:
        artifact_type = ctx.request.query_params.get("artifactType") or None
        assert ctx.route.digest is not None
        if artifact_type is not None and not valid_media_type(artifact_type):
            refs = []  # matches no stored manifest (all valid), and may hold a NUL (see _tags)
        else:
            refs = await self.db.read(self.meta.referrers, ctx.full, str(ctx.route.digest), artifact_type)
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

    async def _get_blob(self, ctx: RequestContext) -> Response:
        digest = ctx.route.digest
        assert digest is not None
        size = await self.db.read(self.meta.blob_size, ctx.full, str(digest))
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
        if ctx.request.method == "HEAD":
            # clients skip uploading what HEAD says exists: say so only if the bytes are
            # there.  Range is ignored: only GET has range handling (RFC 9110 14.2).
            if not path.is_file():
                raise ApiError("BLOB_UNKNOWN", f"blob {digest} is not available")
            headers["Content-Length"] = str(size)
            return Response(b"", headers=headers)
        range_value = ctx.request.headers.get("range")
        span = parse_range(range_value, size) if range_value else None
        return BlobResponse(str(path), size, span, headers)

    async def _delete_blob(self, ctx: RequestContext) -> Response:
        assert ctx.route.digest is not None
        if not await self.db.write(self.meta.unlink_blob, ctx.full, str(ctx.route.digest)):
            raise ApiError("BLOB_UNKNOWN", f"blob {ctx.route.digest} is not in this repository")
        return Response(b"", status_code=202, headers=API_VERSION)
