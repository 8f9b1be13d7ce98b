"""``ember image ...``: pull, list, inspect, remove and unpack images."""

from __future__ import annotations

import click


@click.group()
def image() -> None:
    """Manage images in the host's content store."""


commands: list[click.Command] = [image]
