"""$EMBER_HOME/config.json: one reader for every area."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.config import ConfigError, config_section, read_config
from ember.errors import EmberError
from ember.home import Home


class AreaError(EmberError):
    pass


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert read_config(home) == {}
    assert config_section(home, "network") is None


def test_sections(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.config_file.write_text('{"network": {"mtu": 1400}, "kernel": 3}')
    assert config_section(home, "network") == {"mtu": 1400}
    assert config_section(home, "snapshots") is None
    with pytest.raises(ConfigError, match="'kernel' must be an object"):
        config_section(home, "kernel")


@pytest.mark.parametrize("text", ["{broken", "[1, 2]", "\xff"])
def test_broken_file_raises_the_callers_error(tmp_path: Path, text: str) -> None:
    home = Home(tmp_path)
    home.config_file.write_text(text, errors="surrogateescape")
    with pytest.raises(AreaError, match="config.json"):
        config_section(home, "network", AreaError)
