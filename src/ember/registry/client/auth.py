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

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)\s*")
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)')
_SEPARATORS = re.compile(r"[\s,]*")

#: a challenge header longer than this is refused unparsed: a registry's is a few hundred
#: bytes, and a hostile one sent ~6 MB (http.client takes 100 headers of 64 KiB each)
MAX_CHALLENGE_HEADER = 16 * 1024
#: parameters kept per challenge, and challenges per header, at most (the rest is ignored)
MAX_PARAMS = 32
MAX_CHALLENGES = 16


class ChallengeTooLarge(ValueError):
    """A ``WWW-Authenticate`` value longer than ``MAX_CHALLENGE_HEADER``."""


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "bearer" or "basic" (others are kept but unsupported)
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenges(header: str) -> list[Challenge]:
    """All challenges in one ``WWW-Authenticate`` value; tolerant of junk.

    ChallengeTooLarge for a value longer than ``MAX_CHALLENGE_HEADER``, and nothing else
    raises.  The value is scanned once with a moving position (slicing off what each
    match consumed copied the rest every time: quadratic, minutes for megabytes).
    """
    if len(header) > MAX_CHALLENGE_HEADER:
        raise ChallengeTooLarge(
            f"a WWW-Authenticate header of {len(header)} bytes (more than {MAX_CHALLENGE_HEADER})"
        )
    out: list[Challenge] = []
    pos = _skip_separators(header, 0)
    while pos < len(header) and len(out) < MAX_CHALLENGES:
        m = _SCHEME.match(header, pos)
        if not m:
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        for _ in range(MAX_PARAMS):
            pm = _PARAM.match(header, pos) if pos < len(header) else None
            if not pm:
                break
            value = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = pm.end()
        else:
            out.append(Challenge(scheme, params))
            break  # no telling where this challenge's parameters end: the rest is ignored
        out.append(Challenge(scheme, params))
        pos = _skip_separators(header, pos)
    return out


def _skip_separators(header: str, pos: int) -> int:
    m = _SEPARATORS.match(header, pos)
    return m.end() if m else pos


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def repository_of(scope: str) -> str | None:
    """The repository a ``pull_scope`` names; None for another kind of scope."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return name if kind == "repository" and name and actions == "pull" else None


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
