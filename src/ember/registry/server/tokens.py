"""Credentials (pure): ember API tokens, scopes, and the short-lived registry token.

*API tokens* (``ember_...``) are what ``ember admin token create`` hands out.
Only their sha256 is stored; a token belongs to one organization and holds a
set of actions (``pull``, ``push``, ``delete``).

*Registry tokens* are what ``/token`` issues in Docker's token flow: a compact
HS256 JWT-shaped token carrying the organization and the exact per-repository
actions granted.  Verification accepts only ``HS256`` and never looks at
``jwk``/``jku``/``x5u`` or any other header field (Distribution
CVE-2025-24976 trusted an embedded key), so a token is valid only if it was
signed with the server's own key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from ember import jsonutil
from ember.registry.server.names import qualify, valid_repo_name

_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
API_TOKEN_PREFIX = "ember_"
ACTIONS = frozenset({"pull", "push", "delete"})
ALGORITHMS = ("HS256",)  # the only algorithm ever accepted
ISSUER = "ember"
AUDIENCE = "ember"
TOKEN_TTL = 300  # seconds a registry token lives
LEEWAY = 30  # clock skew tolerated on exp/nbf
MAX_TOKEN_LENGTH = 16384


class InvalidToken(Exception):
    """A registry token that is malformed, unsigned, foreign or expired."""


# -- API tokens --------------------------------------------------------------


def new_api_token() -> tuple[str, str]:
    """(token id for listing/revoking, the secret shown once)."""
    return secrets.token_hex(8), API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_api_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def is_api_token(text: str) -> bool:
    return text.startswith(API_TOKEN_PREFIX)


def parse_actions(text: str) -> frozenset[str]:
    actions = frozenset(a.strip() for a in text.split(",") if a.strip())
    unknown = actions - ACTIONS
    if unknown or not actions:
        raise ValueError(
            f"invalid actions {text!r}: use a comma-separated subset of {', '.join(sorted(ACTIONS))}"
        )
    if "pull" not in actions:
        # docker, podman and skopeo read a repository (blob HEAD, manifest GET)
        # before they push to it or delete from it: such a token works for none
        raise ValueError(
            f"invalid actions {text!r}: clients read a repository before they push to it or "
            f"delete from it, so every token needs pull (--access pull,{','.join(sorted(actions))})"
        )
    return actions


# -- scopes ------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    type: str  # "repository" or "registry"
    name: str  # the repository name as the client wrote it, or "catalog"
    actions: frozenset[str]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"


def parse_scope(text: str) -> Scope | None:
    """One ``scope=`` value (``repository:team/web:pull,push``); None if unusable."""
    if len(text) > 512:
        return None
    head, sep, actions = text.rpartition(":")
    if not sep:
        return None
    typ, sep, name = head.partition(":")
    if not sep:
        return None
    acts = frozenset(a for a in actions.split(",") if a)
    if typ == "repository" and valid_repo_name(name):
        return Scope(typ, name, acts)
    if typ == "registry" and name == "catalog":
        return Scope(typ, name, acts)
    return None


#: scopes honoured per token request (docker asks for two or three); keeps tokens small
MAX_SCOPES = 20


def parse_scopes(values: list[str]) -> list[Scope]:
    """The scopes of a request; one parameter may also hold several, space-separated."""
    out = []
    for value in values:
        for part in value.split():
            scope = parse_scope(part)
            if scope is not None:
                out.append(scope)
            if len(out) == MAX_SCOPES:
                return out
    return out


@dataclass(frozen=True)
class Grant:
    """What a verified credential allows: repositories are stored (qualified) names."""

    org: str
    subject: str
    repositories: dict[str, frozenset[str]] = field(default_factory=dict)
    catalog: bool = False
    #: an API token used directly: every repository of the org with these actions
    org_actions: frozenset[str] = frozenset()
    #: when the API token behind it expires (unix s; None: never): no registry token
    #: made from it outlives it
    expires_at: float | None = None

    def allows(self, full_name: str, action: str) -> bool:
        if action in self.org_actions:
            return full_name.startswith(f"{self.org}/")
        return action in self.repositories.get(full_name, frozenset())


def grant_for(org: str, subject: str, held: frozenset[str], requested: list[Scope]) -> Grant:
    """Intersect what the caller asked for with what its API token holds."""
    repos: dict[str, frozenset[str]] = {}
    catalog = False
    for scope in requested:
        if scope.type == "registry":
            catalog = catalog or "*" in scope.actions
            continue
        wanted = held if "*" in scope.actions else scope.actions & held
        full = qualify(org, scope.name)
        repos[full] = repos.get(full, frozenset()) | wanted
    return Grant(org, subject, {k: v for k, v in repos.items() if v}, catalog)


# -- the registry token (JWT, HS256 only) -------------------------------------


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    if not text or len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        raise InvalidToken("token is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_token(key: bytes, grant: Grant, now: int, ttl: int = TOKEN_TTL) -> str:
    header = {"alg": "HS256", "typ": "JWT"}
    access = [
        {"type": "repository", "name": name, "actions": sorted(actions)}
        for name, actions in sorted(grant.repositories.items())
    ]
    if grant.catalog:
        access.append({"type": "registry", "name": "catalog", "actions": ["*"]})
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": grant.subject,
        "org": grant.org,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": secrets.token_hex(8),
        "access": access,
    }
    signing_input = (
        _b64e(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64e(json.dumps(claims, separators=(",", ":")).encode())
    )
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64e(sig)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        obj = jsonutil.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidToken("token is not JSON") from None
    if not isinstance(obj, dict):
        raise InvalidToken("token part is not a JSON object")
    return obj


def _int_claim(claims: dict[str, Any], name: str) -> int:
    value = claims.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidToken(f"token has no valid {name!r}")
    return value


def decode_token(key: bytes, token: str, now: int) -> Grant:
    """Verify signature and claims; the Grant the token carries."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("token is too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("token is not a signed JWT")
    header = _json_object(_b64d(parts[0]))
    # Only the algorithm is read from the header; key-carrying fields are ignored.
    if header.get("alg") not in ALGORITHMS:
        raise InvalidToken(f"token algorithm {str(header.get('alg'))[:20]!r} is not accepted")
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _b64d(parts[2])):
        raise InvalidToken("token signature does not verify")
    claims = _json_object(_b64d(parts[1]))
    if claims.get("iss") != ISSUER or claims.get("aud") != AUDIENCE:
        raise InvalidToken("token was issued for another service")
    if now > _int_claim(claims, "exp") + LEEWAY:
        raise InvalidToken("token has expired")
    if now + LEEWAY < _int_claim(claims, "nbf"):
        raise InvalidToken("token is not valid yet")
    org, sub = claims.get("org"), claims.get("sub")
    if not isinstance(org, str) or not isinstance(sub, str):
        raise InvalidToken("token has no organization")
    repos: dict[str, frozenset[str]] = {}
    catalog = False
    access = claims.get("access")
    if not isinstance(access, list):
        raise InvalidToken("token has no access list")
    for entry in access:
        if not isinstance(entry, dict):
            raise InvalidToken("token access entry is not an object")
        name, actions = entry.get("name"), entry.get("actions")
        if not isinstance(name, str) or not isinstance(actions, list):
            raise InvalidToken("token access entry is malformed")
        acts = frozenset(a for a in actions if isinstance(a, str))
        if entry.get("type") == "repository":
            repos[name] = repos.get(name, frozenset()) | (acts & ACTIONS)
        elif entry.get("type") == "registry" and name == "catalog":
            catalog = True
    return Grant(org, sub, repos, catalog)
