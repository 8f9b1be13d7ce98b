"""Applying an nftables script (I/O through ``nft -f``)."""

from __future__ import annotations

import subprocess

from ember.net.errors import NetworkError


def apply(script: str) -> None:
    try:
        res = subprocess.run(
            ["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise NetworkError("nft not found", hint="install nftables") from None
    if res.returncode != 0:
        first = (res.stderr.strip().splitlines() or ["no output"])[0]
        raise NetworkError(f"nft rejected ember's ruleset: {first}")
