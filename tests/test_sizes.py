"""The one size grammar (ember.sizes)."""

from __future__ import annotations

import pytest

from ember.errors import UsageError
from ember.sizes import MAX_SIZE, InvalidSize, parse_size


@pytest.mark.parametrize(
    ("text", "want"),
    [("4096", 4096), ("2G", 2 << 30), ("512M", 512 << 20), ("1GiB", 1 << 30), ("1.5g", 3 << 29),
     ("10k", 10240), ("1T", 1 << 40), ("3mb", 3 << 20)],
)  # fmt: skip
def test_sizes(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize(
    "bad", ["", "G", "-1G", "1X", "1 GB extra", "0", "nan", "1e3", "\u0661G", "9000000T", "2048T"]
)
def test_sizes_reject(bad: str) -> None:
    with pytest.raises(InvalidSize):
        parse_size(bad)


def test_a_bare_number_takes_the_default_unit() -> None:
    assert parse_size("512", default_unit="m") == 512 << 20
    assert parse_size("1G", default_unit="m") == 1 << 30


def test_bounds_and_class() -> None:
    assert parse_size("1024T") == MAX_SIZE
    with pytest.raises(InvalidSize, match="more than 1 PiB"):
        parse_size("1025T")
    assert issubclass(InvalidSize, UsageError)  # a user's mistake: one line, exit 2
