"""Volume names and ``ember run -v`` arguments (pure, no I/O).

A volume is an ext4 block device of its own, attached to a machine as another
virtio disk and mounted by ember-init (docs/volumes.md).  ``-v`` takes Docker's
named-volume form, ``NAME:TARGET[:OPTIONS]`` (``ro`` or ``rw``, ``nocopy``); a host directory (``/srv:/data``)
cannot be shared with a guest that has its own kernel, and an anonymous volume
(``-v /data``) would be a disk nobody can name again: both are refused.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ember.volumes.errors import InvalidVolumeSpec

#: Docker's volume name rule, bounded
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{1,127}$")
#: volumes one machine may have: its disks are vdb.. after the root disk's vda
MAX_VOLUMES = 16
#: a volume's disk is the snapshot (and its lease) of this key and its name
KEY_PREFIX = "volume/"


def check_volume_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise InvalidVolumeSpec(
            f"invalid volume name {name!r:.140}: use 2 to 128 letters, digits, '_', '.', "
            "'-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class VolumeMount:
    """One ``-v``: volume ``name`` mounted at ``target`` (normalized, absolute) in the guest."""

    name: str
    target: str
    read_only: bool = False
    #: copy the image's files at ``target`` into the volume when it is empty (Docker's
    #: copy-up, done by ``ember run``; ``nocopy`` turns it off).  Not kept in the record.
    copy: bool = field(default=True, compare=False)

    def __str__(self) -> str:
        """The form a machine's record keeps (and ``-v`` takes): ``NAME:TARGET[:ro]``."""
        return f"{self.name}:{self.target}" + (":ro" if self.read_only else "")

    def device(self, index: int) -> str:
        """The guest's device for the machine's ``index``-th volume (after the root disk)."""
        return f"/dev/vd{chr(ord('b') + index)}"


def parse_volume(text: str) -> VolumeMount:
    """``NAME:TARGET[:OPTIONS]``, the options comma-separated: ``ro`` or ``rw``, and
    ``nocopy``; InvalidVolumeSpec, saying why, for anything else."""
    what = f"-v {text!r:.200}"
    if "\x00" in text or "\n" in text:
        raise InvalidVolumeSpec(f"{what}: not a volume (control characters)")
    parts = text.split(":")
    if text.startswith(("/", ".", "~")) and len(parts) >= 2:
        raise InvalidVolumeSpec(
            f"{what}: a host directory cannot be mounted into a machine (it runs its own "
            "kernel); use a named volume, NAME:TARGET (ember volume create NAME)"
        )
    if len(parts) == 1:
        raise InvalidVolumeSpec(
            f"{what}: expected NAME:TARGET (a volume needs a name and a place in the machine; "
            "anonymous volumes are not kept)"
        )
    if len(parts) > 3:
        raise InvalidVolumeSpec(f"{what}: expected NAME:TARGET[:ro|rw][,nocopy]")
    name, target = parts[0], parts[1]
    options = parts[2].split(",") if len(parts) == 3 else []
    for option in options:
        if option not in ("ro", "rw", "nocopy"):
            raise InvalidVolumeSpec(f"{what}: unknown option {option!r:.40} (ro, rw, nocopy)")
        if options.count(option) > 1:
            raise InvalidVolumeSpec(f"{what}: {option} is given twice")
    if "ro" in options and "rw" in options:
        raise InvalidVolumeSpec(f"{what}: ro and rw both given")
    check_volume_name(name)
    if not target.startswith("/"):
        raise InvalidVolumeSpec(f"{what}: the target {target!r:.100} must be an absolute path")
    if ".." in target.split("/"):
        raise InvalidVolumeSpec(f"{what}: the target {target!r:.100} must not contain '..'")
    normalized = posixpath.normpath(target)
    if not normalized.strip("/"):
        raise InvalidVolumeSpec(f"{what}: a volume cannot be mounted over /")
    if normalized.startswith("//"):  # (normpath keeps POSIX's implementation-defined "//")
        normalized = "/" + normalized.lstrip("/")
    return VolumeMount(name, normalized, "ro" in options, copy="nocopy" not in options)


def volume_key(name: str) -> str:
    return KEY_PREFIX + check_volume_name(name)


def mount_order(volumes: Sequence[VolumeMount]) -> list[int]:
    """The order to mount a machine's volumes in (their indexes): a target before the
    targets inside it (as Docker sorts mounts), so that ``-v a:/data/sub -v b:/data``
    does not hide ``a`` under ``b``; the order given otherwise."""
    return sorted(range(len(volumes)), key=lambda i: volumes[i].target.count("/"))


def parse_volumes(texts: Iterable[str]) -> tuple[VolumeMount, ...]:
    """Every ``-v`` of a run: at most ``MAX_VOLUMES``, each volume and target once."""
    mounts = tuple(parse_volume(t) for t in texts)
    if len(mounts) > MAX_VOLUMES:
        raise InvalidVolumeSpec(f"-v: at most {MAX_VOLUMES} volumes per machine")
    for i, m in enumerate(mounts):
        for other in mounts[:i]:
            if other.name == m.name:
                # one ext4 mounted twice by one kernel through two disks: corruption
                raise InvalidVolumeSpec(f"-v: volume {m.name} is given twice")
            if other.target == m.target:
                raise InvalidVolumeSpec(f"-v: two volumes are mounted at {m.target}")
    return mounts
