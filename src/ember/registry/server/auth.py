"""Who is calling and what it may do: the Basic and Bearer credentials of a request,
the ``/token`` endpoint (Docker's token flow) and the answers to a refused action."""

from __future__ import annotations

import base64
import binascii
import time
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember.registry.server.context import RequestContext, read_limited
from ember.registry.server.dbcalls import DbCalls
from ember.registry.server.errors import ApiError, method_not_allowed
from ember.registry.server.metadata import RegistryMetadata, ResolvedToken
from ember.registry.server.protocol import challenge
from ember.registry.server.revocations import Revocations
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

#: how long a resolved API token is trusted before the database is asked again (its
#: revocation is seen sooner or as soon: see revocations.py)
_TOKEN_CACHE_SECONDS = 5.0


class Authenticator:
    """Turns a request's credential into a Grant, and API tokens into registry tokens
    (``/token``), with the server's signing key."""

    def __init__(self, meta: RegistryMetadata, db: DbCalls, token_key: bytes) -> None:
        self.meta = meta
        self.db = db
        self._token_key = token_key
        self._token_cache: dict[str, tuple[float, ResolvedToken | None]] = {}
        self._revocations = Revocations()

    async def authenticate(self, request: Request) -> tuple[Grant | None, bool]:
        """(grant, is_registry_token); raises 401 for credentials that are invalid."""
        cred = credential(request)
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
                    headers={"WWW-Authenticate": challenge(realm(request), error="invalid_token")},
                ) from None
            if await self._revoked(issued.subject):
                raise ApiError(
                    "UNAUTHORIZED",
                    "invalid token: the ember token it was issued for has been revoked",
                    headers={"WWW-Authenticate": challenge(realm(request), error="invalid_token")},
                )
            return issued, True
        grant = await self._api_grant(secret)
        if grant is None:
            raise ApiError(
                "UNAUTHORIZED",
                "unknown or revoked ember token",
                headers={"WWW-Authenticate": challenge(realm(request), error="invalid_token")},
            )
        return grant, False

    async def token(self, request: Request) -> Response:
        """``/token``: a registry token for the scopes asked, as far as the API token
        (basic auth's password, a bearer token, or POST's password) holds them."""
        params = request.query_params
        scopes_raw = params.getlist("scope")
        secret: str | None = None
        if request.method == "POST":
            form = parse_qs((await read_limited(request, 65536)).decode("latin-1"))
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
            cred = credential(request)
            secret = cred[1] if cred else None
        else:
            raise method_not_allowed(request.method, ("GET", "POST"))
        grant = await self._api_grant(secret) if secret else None
        now = int(time.time())
        ttl = TOKEN_TTL
        if grant is not None and grant.expires_at is not None:  # none outlives its API token
            ttl = min(ttl, int(grant.expires_at) - now)
            if ttl < 1:
                grant = None  # it expires within the second
        if grant is None:
            raise ApiError(
                "UNAUTHORIZED",
                "unknown or revoked ember token" if secret
                else "an ember token is required (as the password of basic auth, or as a bearer token)",
                headers={"WWW-Authenticate": 'Basic realm="ember"'},
            )
        scoped = grant_for(grant.org, grant.subject, grant.org_actions, parse_scopes(scopes_raw))
        token = encode_token(self._token_key, scoped, now, ttl)
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return JSONResponse(
            {"token": token, "access_token": token, "expires_in": ttl, "issued_at": issued}
        )

    async def _resolve_api_token(self, secret: str) -> ResolvedToken | None:
        now = time.monotonic()
        cached = self._token_cache.get(secret)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self.db.read(self.meta.resolve_token, secret)
        if len(self._token_cache) > 10000:
            self._token_cache.clear()
        self._token_cache[secret] = (now + _TOKEN_CACHE_SECONDS, found)
        return found

    async def _revoked(self, token_id: str) -> bool:
        """Whether ``token_id`` was revoked (as of at most REFRESH_S ago)."""
        if self._revocations.due():
            await self.db.read(self._revocations.refresh, self.meta.revoked_since)
        return token_id in self._revocations

    async def _api_grant(self, secret: str) -> Grant | None:
        found = await self._resolve_api_token(secret) if is_api_token(secret) else None
        if found is None or found.expired(time.time()):  # (it may have expired since cached)
            return None
        if await self._revoked(found.token_id):  # resolved (and cached) before its revocation
            return None
        return Grant(found.org, found.token_id, org_actions=found.actions, expires_at=found.expires_at)


def realm(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}/token"


def credential(request: Request) -> tuple[str, str] | None:
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


def require(ctx: RequestContext, action: str) -> None:
    """Refuse the request unless its grant allows ``action`` on its repository."""
    scope_actions = {"pull": "pull", "push": "pull,push", "delete": "delete"}[action]
    scope = f"repository:{ctx.route.name}:{scope_actions}"
    if ctx.grant is None or not ctx.grant.allows(ctx.full, action):
        raise deny(
            ctx.request, ctx.grant, ctx.jwt, scope, f"{action} access to {ctx.route.name!r} denied"
        )


def deny(request: Request, grant: Grant | None, jwt: bool, scope: str, message: str) -> ApiError:
    if grant is None:
        return ApiError(
            "UNAUTHORIZED",
            "authentication required",
            headers={"WWW-Authenticate": challenge(realm(request), scope)},
        )
    if jwt:
        # 403, not Docker's 401: oras-py fetches a new token only after a 403, while
        # docker, podman and skopeo ask for every scope they need up front.  The
        # challenge still names the scope, so any client can get a wider token.
        return ApiError(
            "DENIED",
            message,
            headers={"WWW-Authenticate": challenge(realm(request), scope, "insufficient_scope")},
        )
    return ApiError("DENIED", message)
