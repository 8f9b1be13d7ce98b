"""Docker's ``--filter KEY=VALUE`` (pure): parsing, and the matches every listing
shares (``ember ps``: ``machines.listing``; ``ember volume ls/prune``:
``volumes.listing``).  Filters of one key match when any of their values does;
filters of different keys must all match; ``label=`` filters must all match."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from ember.errors import UsageError


class InvalidFilter(UsageError):
    """A ``--filter`` that is not KEY=VALUE, has an unknown key or a bad value."""


def parse_filters(specs: Iterable[str], keys: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each ``KEY=VALUE`` of ``specs`` (keys of ``keys``, lower-cased), grouped by key in
    the order given; InvalidFilter for any other.  Checking values is the caller's."""
    found: dict[str, list[str]] = {}
    for spec in specs:
        key, eq, value = spec.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key:
            raise InvalidFilter(f"bad filter {spec!r}: expected KEY=VALUE", hint=f"keys: {', '.join(keys)}")
        if key not in keys:
            raise InvalidFilter(f"invalid filter {key!r}", hint=f"keys: {', '.join(keys)}")
        found.setdefault(key, []).append(value)
    return {k: tuple(v) for k, v in found.items()}


def check_pattern(key: str, value: str) -> None:
    """A ``name=``/``id=`` value: a regular expression (InvalidFilter if it is none)."""
    try:
        re.compile(value)
    except re.error as e:
        raise InvalidFilter(f"invalid filter '{key}={value}': {e}") from None


def matches(pattern: str, text: str) -> bool:
    """docker's ``Match``: the same text, or a regular expression found in it."""
    return pattern == text or re.search(pattern, text) is not None


def labels_match(wanted: Sequence[str], labels: Mapping[str, str]) -> bool:
    """Every ``KEY`` or ``KEY=VALUE`` of ``wanted`` is a label of ``labels``."""
    for item in wanted:
        key, eq, value = item.partition("=")
        if key not in labels or (eq and labels[key] != value):
            return False
    return True
