"""Which volumes ``ember volume ls`` and ``volume prune`` take: docker's ``--filter``
for volumes (pure; the caller says which volumes machines use).

Keys: ``name`` (a regular expression, as ``ps``), ``label`` (``KEY`` or
``KEY=VALUE``; every one must match), ``dangling`` (``true``: no machine's record
names it; ``false``: one does).  How filters combine: ``ember.filters``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from ember.filters import InvalidFilter, check_pattern, labels_match, matches, parse_filters
from ember.volumes.store import VolumeInfo

KEYS = ("dangling", "label", "name")
#: the keys ``volume prune`` takes (docker's: it prunes dangling volumes only)
PRUNE_KEYS = ("label",)
_TRUTH = {"true": True, "1": True, "false": False, "0": False}


@dataclass(frozen=True)
class VolumeFilters:
    names: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    #: None: either; else whether the volume is one no machine uses
    dangling: bool | None = None

    @classmethod
    def parse(cls, specs: Iterable[str], keys: Sequence[str] = KEYS) -> VolumeFilters:
        found = parse_filters(specs, keys)
        for value in found.get("name", ()):
            check_pattern("name", value)
        for value in found.get("label", ()):
            if not value:
                raise InvalidFilter("invalid filter 'label=': it needs a value")
        dangling = {_truth(v) for v in found.get("dangling", ())}
        if len(dangling) > 1:
            raise InvalidFilter("dangling=true and dangling=false together match nothing")
        return cls(found.get("name", ()), found.get("label", ()), dangling.pop() if dangling else None)

    def select(self, volumes: Sequence[VolumeInfo], used: Collection[str]) -> list[VolumeInfo]:
        """The volumes of ``volumes`` that match, in their order; ``used``: the names of
        the volumes machines' records name."""
        return [
            v for v in volumes
            if (not self.names or any(matches(p, v.name) for p in self.names))
            and labels_match(self.labels, v.labels)
            and (self.dangling is None or self.dangling == (v.name not in used))
        ]  # fmt: skip


def _truth(value: str) -> bool:
    try:
        return _TRUTH[value.lower()]
    except KeyError:
        raise InvalidFilter(f"invalid filter 'dangling={value}': true or false") from None
