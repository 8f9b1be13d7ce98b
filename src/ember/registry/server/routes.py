"""Parsing ``/v2/...`` request paths into routes (pure).

The raw (still percent-encoded) path is checked first: no legitimate name,
tag, digest or session id contains ``%``, ``.``/``..`` segments or empty
segments, so any of those is refused before names are rewritten or
authorization is looked at (Harbor GHSA-qj39-pjf2-wmrc was a path normalized
*after* authorization).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ember.oci.digest import Digest
from ember.oci.errors import InvalidDigest
from ember.registry.server.errors import ApiError
from ember.registry.server.names import valid_repo_name, valid_tag

#: longest path we look at; real ones are a few hundred bytes
MAX_PATH = 2048
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")

BASE = "base"
CATALOG = "catalog"
TAGS = "tags"
MANIFEST = "manifest"
BLOB = "blob"
UPLOAD_START = "upload_start"
UPLOAD = "upload"
REFERRERS = "referrers"


@dataclass(frozen=True)
class Route:
    kind: str
    name: str = ""  # the repository name as the client sent it
    tag: str | None = None
    digest: Digest | None = None
    upload_id: str | None = None

    @property
    def reference(self) -> str:
        return str(self.digest) if self.digest is not None else (self.tag or "")


def _refuse(message: str) -> ApiError:
    return ApiError("NAME_INVALID", message, status=400)


def check_raw_path(raw: bytes) -> str:
    """The path as text, or ApiError if it holds anything no valid path has."""
    if len(raw) > MAX_PATH:
        raise _refuse("request path is too long")
    try:
        path = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _refuse("request path is not ASCII") from None
    if "%" in path or "\\" in path:
        raise _refuse("percent-encoded characters and backslashes are not allowed in registry paths")
    segments = path.split("/")
    if any(s in (".", "..") for s in segments):
        raise _refuse("dot segments are not allowed in registry paths")
    return path


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidDigest as e:
        raise ApiError("DIGEST_INVALID", str(e)) from None


def _name(parts: list[str]) -> str:
    name = "/".join(parts)
    if not parts or not valid_repo_name(name):
        raise _refuse(f"invalid repository name {name[:100]!r}")
    return name


def parse_path(raw: bytes) -> Route:
    """Route for a raw request path, which must start with ``/v2``."""
    path = check_raw_path(raw)
    if path in ("/v2", "/v2/"):
        return Route(BASE)
    if not path.startswith("/v2/"):
        raise ApiError("NAME_UNKNOWN", "not a registry path", status=404)
    segs = path[len("/v2/") :].split("/")
    if segs == ["_catalog"]:
        return Route(CATALOG)
    # Upload start: .../blobs/uploads or .../blobs/uploads/
    if segs[-1] == "":
        segs = segs[:-1]
        if len(segs) >= 3 and segs[-2:] == ["blobs", "uploads"]:
            return Route(UPLOAD_START, _name(segs[:-2]))
        raise ApiError("NAME_UNKNOWN", "unknown registry path", status=404)
    if "" in segs:
        raise _refuse("empty path segments are not allowed in registry paths")
    if len(segs) >= 3 and segs[-2:] == ["tags", "list"]:
        return Route(TAGS, _name(segs[:-2]))
    if len(segs) >= 3 and segs[-2:] == ["blobs", "uploads"]:
        return Route(UPLOAD_START, _name(segs[:-2]))
    if len(segs) >= 4 and segs[-3:-1] == ["blobs", "uploads"]:
        if not _UPLOAD_ID.fullmatch(segs[-1]):
            raise ApiError("BLOB_UPLOAD_UNKNOWN", "unknown upload session")
        return Route(UPLOAD, _name(segs[:-3]), upload_id=segs[-1])
    if len(segs) >= 3 and segs[-2] == "blobs":
        return Route(BLOB, _name(segs[:-2]), digest=_digest(segs[-1]))
    if len(segs) >= 3 and segs[-2] == "referrers":
        return Route(REFERRERS, _name(segs[:-2]), digest=_digest(segs[-1]))
    if len(segs) >= 3 and segs[-2] == "manifests":
        ref = segs[-1]
        name = _name(segs[:-2])
        if ":" in ref:
            return Route(MANIFEST, name, digest=_digest(ref))
        if not valid_tag(ref):
            raise ApiError("TAG_INVALID", f"invalid tag {ref[:140]!r}", status=400)
        return Route(MANIFEST, name, tag=ref)
    raise ApiError("NAME_UNKNOWN", "unknown registry path", status=404)
