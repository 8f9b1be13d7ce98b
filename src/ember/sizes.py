"""Sizes as people write them, and as ember prints them (pure): ``512M``, ``2G``,
``1GiB``, ``1.5g``, ``4096``.

One grammar for every option and setting that takes a size (``--memory``,
``--disk-size``, quotas, ``config.json``'s sizes): binary units, the ``B``/``iB``
suffix optional, any case, a decimal fraction allowed.  What a size must further
be (at least 64M, a multiple of 4 KiB) is each caller's to say.
"""

from __future__ import annotations

import re

from ember.errors import UsageError

#: the largest size anything takes, 1 PiB (a disk of 9000000T was an OverflowError in
#: truncate)
MAX_SIZE = 1 << 50

_SIZE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class InvalidSize(UsageError):
    """A size that is not one, or not between 1 byte and ``MAX_SIZE``."""


def parse_size(text: str, *, default_unit: str = "") -> int:
    """Bytes (``default_unit`` applies to a bare number: ``"m"`` makes ``512`` 512 MiB)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise InvalidSize(f"invalid size {text!r} (examples: 512M, 2G, 1GiB)")
    number, unit, _ = m.groups()
    value = float(number) * _UNITS[(unit or default_unit).lower()]
    if value < 1:
        raise InvalidSize(f"invalid size {text!r}: it must be at least 1 byte")
    if value > MAX_SIZE:
        raise InvalidSize(f"invalid size {text!r}: more than {MAX_SIZE >> 50} PiB")
    return int(value)


def human_size(n: int, *, decimal: bool = False) -> str:
    """One decimal: ``1.5 GiB`` (binary units, as the sizes ember takes: quotas, disks);
    ``decimal``: ``1.6 GB``, as ``docker images`` shows an image's size."""
    base, units = (
        (1000, ("B", "kB", "MB", "GB", "TB"))
        if decimal
        else (1024, ("B", "KiB", "MiB", "GiB", "TiB"))
    )
    value = float(n)
    for unit in units:
        if value < base or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= base
    return f"{n} B"
