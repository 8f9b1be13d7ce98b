"""Upload-session state carried in ``Location`` URLs, HMAC-signed (pure).

The ``_state`` query parameter binds organization, repository, session id,
offset and expiry.  A URL copied to another tenant, altered, or kept past its
expiry fails verification; the comparison is constant-time.  The key comes
from configuration, so replicas sharing it accept each other's URLs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass

#: how long an upload session (and the URLs naming it) stay valid
UPLOAD_TTL = 24 * 3600
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_DOMAIN = b"ember-upload-state-v1\0"


class InvalidUploadState(Exception):
    pass


@dataclass(frozen=True)
class UploadState:
    org: str
    repo: str  # the qualified repository name
    session: str
    offset: int
    expires: int


def sign_state(key: bytes, state: UploadState) -> str:
    payload = json.dumps(
        [state.org, state.repo, state.session, state.offset, state.expires], separators=(",", ":")
    ).encode()
    mac = hmac.new(key, _DOMAIN + payload, hashlib.sha256).digest()
    return (
        base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
        + "."
        + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    )


def _b64d(text: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidUploadState("upload state is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_state(key: bytes, text: str, now: int) -> UploadState:
    if len(text) > 2048:
        raise InvalidUploadState("upload state is too long")
    payload_b64, sep, mac_b64 = text.partition(".")
    if not sep:
        raise InvalidUploadState("upload state is not signed")
    payload = _b64d(payload_b64)
    expected = hmac.new(key, _DOMAIN + payload, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _b64d(mac_b64)):
        raise InvalidUploadState("upload state signature does not verify")
    try:
        org, repo, session, offset, expires = json.loads(payload)
    except (ValueError, TypeError):
        raise InvalidUploadState("upload state is malformed") from None
    if not (
        isinstance(org, str)
        and isinstance(repo, str)
        and isinstance(session, str)
        and isinstance(offset, int)
        and isinstance(expires, int)
    ):
        raise InvalidUploadState("upload state is malformed")
    # expired at ``expires`` itself, as its database row is (it stops counting against
    # the quota then, and a purge may delete it): a URL never outlives its session
    if now >= expires:
        raise InvalidUploadState("upload session has expired")
    return UploadState(org, repo, session, offset, expires)
