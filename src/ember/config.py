"""``$EMBER_HOME/config.json``: one JSON object, one section per area.

    {"snapshots": {...}, "network": {...}, "kernel": {...}, "logs": {...},
     "templates": {...}, "registry_secret": "..."}

Every area reads it through these two functions, so a missing file means
"defaults", and a broken one gives the same clear message everywhere (raised
as the caller's own error class, keeping each area's error hierarchy).
"""

from __future__ import annotations

from typing import Any

from ember import jsonutil
from ember.errors import EmberError
from ember.home import Home


class ConfigError(EmberError):
    """``config.json`` cannot be read or does not have the expected shape."""


def read_config(home: Home, error: type[EmberError] = ConfigError) -> dict[str, Any]:
    """The whole file as a dict; ``{}`` when there is no file."""
    path = home.config_file
    try:
        data = jsonutil.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data


def config_section(
    home: Home, name: str, error: type[EmberError] = ConfigError
) -> dict[str, Any] | None:
    """One area's section, or None when it is absent."""
    section = read_config(home, error).get(name)
    if section is not None and not isinstance(section, dict):
        raise error(f"{home.config_file}: {name!r} must be an object")
    return section
