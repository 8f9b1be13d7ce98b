"""The kernel's packet filter: applying an nftables script (``nft -f``) and forgetting
a machine's tracked connections (``conntrack -D``)."""

from __future__ import annotations

import logging
import subprocess

from ember.net.errors import NetworkError

log = logging.getLogger(__name__)


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


def table_listing(family: str, name: str) -> str | None:
    """``nft list table FAMILY NAME`` here (None: there is no such table)."""
    try:
        res = subprocess.run(
            ["nft", "list", "table", family, name], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise NetworkError("nft not found", hint="install nftables") from None
    if res.returncode != 0:
        if "No such file or directory" in res.stderr:
            return None
        first = (res.stderr.strip().splitlines() or ["no output"])[0]
        raise NetworkError(f"cannot read nftables table {family} {name}: {first}")
    return res.stdout


def forget_flows(address: str) -> None:
    """Delete the connection tracking entries of a machine's address that is being freed.

    Without this the entries outlive the machine and its rules (established TCP for
    days, UDP for minutes): a published port's clients kept being translated to the
    address, which the next machine, maybe another tenant's, is given, and that
    machine's answers reached them as the old one's.  Both kinds go: flows the
    machine began (original source) and flows translated to it (reply source).
    A failure is logged, not raised: the machine is gone either way."""
    for selector in ("--orig-src", "--reply-src"):
        try:
            res = subprocess.run(
                ["conntrack", "-D", "-f", "ipv4", selector, address],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
        except FileNotFoundError:
            log.warning(
                "conntrack not found (Debian: apt install conntrack): tracked connections of "
                "%s stay until they time out, and follow the address to its next machine",
                address,
            )
            return
        # exit 1 with "0 flow entries have been deleted" is nothing to delete
        if res.returncode != 0 and " 0 flow entries" not in res.stderr:
            first = (res.stderr.strip().splitlines() or ["no output"])[0]
            log.warning("cannot delete the tracked connections of %s: %s", address, first)
