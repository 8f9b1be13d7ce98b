from __future__ import annotations

from pathlib import Path

import pytest

from ember.filters import InvalidFilter
from ember.volumes.listing import PRUNE_KEYS, VolumeFilters
from ember.volumes.store import VolumeInfo


def _volume(name: str, **labels: str) -> VolumeInfo:
    return VolumeInfo(name, 1 << 30, Path("/d"), 0.0, labels)


VOLUMES = [_volume("db", app="shop", tier="data"), _volume("cache", app="shop"), _volume("logs")]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([], ["db", "cache", "logs"]),
        (["dangling=true"], ["cache", "logs"]),
        (["dangling=FALSE"], ["db"]),
        (["label=app"], ["db", "cache"]),
        (["label=app=shop", "label=tier=data"], ["db"]),  # every label filter must match
        (["name=^c", "name=gs$"], ["cache", "logs"]),  # any name filter may
        (["name=d", "dangling=0"], ["db"]),
        (["name=db", "label=tier=other"], []),
    ],
)
def test_filters_select_as_dockers(filters: list[str], expected: list[str]) -> None:
    assert [v.name for v in VolumeFilters.parse(filters).select(VOLUMES, {"db"})] == expected


@pytest.mark.parametrize(
    ("filters", "said"),
    [
        (["dangling=true", "dangling=false"], "match nothing"),
        (["dangling="], "true or false"),
        (["label="], "needs a value"),
        (["driver=local"], "invalid filter 'driver'"),
        (["name=[a"], "invalid filter 'name=[a'"),
    ],
)
def test_bad_filters_are_refused_saying_why(filters: list[str], said: str) -> None:
    with pytest.raises(InvalidFilter, match=said.replace("[", r"\[")):
        VolumeFilters.parse(filters)


def test_prune_takes_label_filters_only() -> None:
    assert VolumeFilters.parse(["label=a=b"], PRUNE_KEYS).labels == ("a=b",)
    with pytest.raises(InvalidFilter, match="invalid filter 'name'"):
        VolumeFilters.parse(["name=x"], PRUNE_KEYS)
