"""One ``/v2/`` request as its handler sees it (route, grant, the qualified repository
name), and reading a request's body within a bound."""

from __future__ import annotations

from starlette.requests import Request

from ember.registry.server import routes as r
from ember.registry.server.errors import ApiError
from ember.registry.server.protocol import content_length
from ember.registry.server.tokens import Grant


class RequestContext:
    __slots__ = ("request", "route", "grant", "jwt", "full")

    def __init__(self, request: Request, route: r.Route, grant: Grant | None, jwt: bool, full: str):
        self.request = request
        self.route = route
        self.grant = grant
        #: the grant came from a registry token (JWT), not an API token used directly
        self.jwt = jwt
        #: the repository's name qualified with the caller's organization
        self.full = full

    @property
    def org(self) -> str:
        """The caller's organization: for handlers behind a checked action (auth.require)."""
        assert self.grant is not None
        return self.grant.org

    def location(self, suffix: str) -> str:
        """A Location under the repository as the client named it."""
        return f"/v2/{self.route.name}/{suffix}"


async def read_limited(request: Request, limit: int) -> bytes:
    size = content_length(request.headers.get("content-length"))
    if size is not None and size > limit:
        raise ApiError("SIZE_INVALID", f"body is larger than {limit} bytes", status=413)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError("SIZE_INVALID", f"body is larger than {limit} bytes", status=413)
    return bytes(buf)


async def discard(request: Request, limit: int) -> None:
    """Read (and drop) the body, up to ``limit`` bytes."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            return
