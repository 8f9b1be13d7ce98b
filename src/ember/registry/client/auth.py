"""Parsing ``WWW-Authenticate`` challenges and caching bearer tokens (pure logic).

Challenge grammar (RFC 7235): ``scheme param=value, param="quoted, value"``.
A registry answers 401 with ``Bearer realm=...,service=...,scope=...`` (token
flow, distribution's token spec) or ``Basic realm=...``.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "bearer" or "basic" (others are kept but unsupported)
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenges(header: str) -> list[Challenge]:
    """All challenges in one ``WWW-Authenticate`` value; tolerant of junk, never raises."""
    out: list[Challenge] = []
    rest = header.strip()
    while rest:
        m = re.match(r"([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)\s*", rest)
        if not m:
            break
        scheme = m.group(1).lower()
        rest = rest[m.end() :]
        params: dict[str, str] = {}
        while rest:
            pm = _PARAM.match(rest)
            if not pm:
                break
            key = pm.group(1).lower()
            value = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[key] = re.sub(r"\\(.)", r"\1", value)
            rest = rest[pm.end() :]
        out.append(Challenge(scheme, params))
        rest = rest.lstrip(", ")
    return out


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float


#: tokens are dropped this long before the registry says they expire
_EXPIRY_MARGIN = 10.0
#: the token spec's default lifetime when ``expires_in`` is absent
DEFAULT_TOKEN_LIFETIME = 60


class TokenCache:
    """Bearer tokens by (realm, service, scope), until shortly before they expire."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], Token] = {}
        self._lock = threading.Lock()

    def get(self, realm: str, service: str, scope: str) -> str | None:
        with self._lock:
            token = self._tokens.get((realm, service, scope))
            if token is None:
                return None
            if token.expires_at - _EXPIRY_MARGIN <= time.monotonic():
                del self._tokens[(realm, service, scope)]
                return None
            return token.value

    def put(self, realm: str, service: str, scope: str, value: str, expires_in: int | None) -> None:
        lifetime = expires_in if expires_in and expires_in > 0 else DEFAULT_TOKEN_LIFETIME
        with self._lock:
            self._tokens[(realm, service, scope)] = Token(value, time.monotonic() + lifetime)

    def drop(self, realm: str, service: str, scope: str) -> None:
        with self._lock:
            self._tokens.pop((realm, service, scope), None)
