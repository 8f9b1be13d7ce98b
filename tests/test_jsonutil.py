"""ember.jsonutil: JSON from outside, every malformation a ValueError."""

from __future__ import annotations

import pytest

from ember import jsonutil


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 5000, b"\xff{}", "{", ""])
def test_every_malformed_text_is_a_value_error(text: str | bytes) -> None:
    with pytest.raises(ValueError):
        jsonutil.loads(text)


def test_sound_json_loads() -> None:
    assert jsonutil.loads(b'{"a": [1, 2]}') == {"a": [1, 2]}
