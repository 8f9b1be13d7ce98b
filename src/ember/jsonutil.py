"""``loads`` for JSON that comes from outside ember's process (a registry, a guest, a
file a user or another program may have written)."""

from __future__ import annotations

import json
from typing import Any


def loads(data: str | bytes, **options: Any) -> Any:
    """``json.loads``, with every way the text can be malformed a ValueError: nesting
    deeper than the parser's recursion limit (``[[[[...`` in a few KB) raises
    RecursionError, which the callers' ``except ValueError`` would let through as a
    traceback.  ``options`` are json.loads's (``object_pairs_hook``)."""
    try:
        return json.loads(data, **options)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
