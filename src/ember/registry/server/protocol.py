"""Header and query parsing for the distribution API (pure).

Content-Range of upload chunks, Range of blob reads, Accept negotiation for
manifests, pagination parameters, and the ``WWW-Authenticate`` challenge.
"""

from __future__ import annotations

import re

from ember.registry.server.errors import ApiError

#: the most entries one tags/list or _catalog page returns (Distribution CVE-2023-2253)
MAX_PAGE = 1000

# [0-9], not \d: \d also matches non-ASCII digits
_NUMBER = re.compile(r"^[0-9]{1,9}$")
_CONTENT_RANGE = re.compile(r"^(?:bytes[= ])?([0-9]{1,19})-([0-9]{1,19})(?:/(?:[0-9]{1,19}|\*))?$")
_RANGE = re.compile(r"^bytes=([0-9]{0,19})-([0-9]{0,19})$")


def parse_content_range(value: str) -> tuple[int, int]:
    """Upload chunk ``start-end`` (inclusive); 416 when malformed or inverted."""
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if not m:
        raise ApiError("BLOB_UPLOAD_INVALID", f"invalid Content-Range {value[:60]!r}", status=416)
    start, end = int(m.group(1)), int(m.group(2))
    if end < start:
        raise ApiError("BLOB_UPLOAD_INVALID", f"invalid Content-Range {value[:60]!r}", status=416)
    return start, end


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """One ``Range: bytes=a-b`` of a blob read as (start, end inclusive).

    None means "send the whole blob": what RFC 9110 14.2 asks for an invalid range
    (``bytes=5-2``: its last position before its first, 14.1.1) and allows for
    anything we do not support, such as several ranges; ApiError 416 when
    unsatisfiable.
    """
    m = _RANGE.fullmatch(value.strip())
    if not m:
        return None
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":
        n = int(last)
        if n == 0 or size == 0:  # no last bytes to send (RFC 9110 14.1.1)
            raise ApiError(
                "RANGE_INVALID",
                "empty suffix range" if n == 0 else "the blob is empty: no range of it can be sent",
                headers={"Content-Range": f"bytes */{size}"},
            )
        return max(size - n, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise ApiError(
            "RANGE_INVALID",
            f"range {value[:60]!r} is outside the blob of {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, min(end, size - 1)


#: a weight (RFC 9110 12.4.2): 0 to 1, at most three decimals
_QVALUE = re.compile(r"^(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)$")


def _media_ranges(accept_values: list[str]) -> list[tuple[str, float]]:
    """The media ranges of Accept headers, each with its weight (``q``)."""
    out = []
    for value in accept_values:
        for item in value.split(","):
            mt, *params = item.split(";")
            mt = mt.strip().lower()
            if mt:
                out.append((mt, _weight(params)))
    return out


def _weight(params: list[str]) -> float:
    """The ``q`` among a media range's parameters: 1 without one (and for one that is
    not a weight: a client's typo should not make a manifest unreadable)."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            value = value.strip()
            return float(value) if _QVALUE.fullmatch(value) else 1.0
    return 1.0


def accepts(accept_values: list[str], media_type: str) -> bool:
    """Whether the client's Accept headers allow a manifest of ``media_type``.

    No Accept at all means anything goes (curl, old clients).  The most specific
    media range that matches decides (RFC 9110 12.5.1), and ``q=0`` means "not
    acceptable" (12.4.2): ``*/*, X;q=0`` refuses X.
    """
    ranges = _media_ranges(accept_values)
    if not ranges:
        return True
    media_type = media_type.lower()
    main = media_type.split("/", 1)[0]
    for candidate in (media_type, f"{main}/*", "*/*"):
        weights = [q for mt, q in ranges if mt == candidate]
        if weights:
            return max(weights) > 0
    return False


def page_size(value: str | None) -> int:
    if value is None or value == "":
        return MAX_PAGE
    if not _NUMBER.fullmatch(value):
        raise ApiError("PAGINATION_NUMBER_INVALID", f"invalid n={value[:20]!r}")
    n = int(value)
    if n > MAX_PAGE:
        raise ApiError(
            "PAGINATION_NUMBER_INVALID", f"n={n} is more than the {MAX_PAGE} entries a page may hold"
        )
    return n


def content_length(value: str | None) -> int | None:
    """A Content-Length header as a number; None when absent or not a plain number."""
    if value is None or not re.fullmatch(r"[0-9]{1,19}", value):
        return None
    return int(value)


def challenge(realm: str, scope: str | None = None, error: str | None = None) -> str:
    parts = [f'Bearer realm="{realm}"', 'service="ember"']
    if scope:
        parts.append(f'scope="{scope}"')
    if error:
        parts.append(f'error="{error}"')
    return ",".join(parts)
