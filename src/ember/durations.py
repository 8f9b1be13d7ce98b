"""Durations as people type them (``10m``, ``1h30m``, ``1.5h``, ``30d``): pure parsing.

Go's ``time.ParseDuration`` units, which Docker's ``--since`` takes, and ``d`` for
days (what token lifetimes are counted in).  No sign: a duration here is always
an amount of time back from now or ahead of it, which the caller knows."""

from __future__ import annotations

import re

_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h|d)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
            "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000}  # fmt: skip
#: longer input is a mistake (or an attempt to make the parser work hard)
MAX_LENGTH = 64


def parse_duration_ns(text: str) -> int | None:
    """``text`` as nanoseconds (one or more number+unit parts), or None if it is not a
    duration."""
    s = text.strip()
    if not s or len(s) > MAX_LENGTH:
        return None
    pos, total = 0, 0
    while m := _PART.match(s, pos):
        total += int(float(m.group(1)) * _UNIT_NS[m.group(2)])
        pos = m.end()
    return total if pos == len(s) else None
