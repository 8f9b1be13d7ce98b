"""Durations as people type them."""

from __future__ import annotations

import pytest

from ember.durations import parse_duration_ns

S = 1_000_000_000


@pytest.mark.parametrize(
    ("text", "ns"),
    [("10m", 600 * S), ("1h30m", 5400 * S), ("1.5h", 5400 * S), ("30d", 30 * 86400 * S),
     ("250ms", S // 4), ("3us", 3000), ("3µs", 3000), (".5s", S // 2), ("0s", 0), (" 2h ", 7200 * S)],
)  # fmt: skip
def test_go_units_and_days(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("text", ["", "10", "m", "-5m", "+5m", "1h30", "5 m", "1y", "1e3s", "1" * 70 + "s"])
def test_anything_else_is_not_a_duration(text: str) -> None:
    assert parse_duration_ns(text) is None
