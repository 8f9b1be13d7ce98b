"""Pure rules for tar entry names: cleaning, whiteouts (image-spec layer.md).

Every name is cleaned lexically as if the archive's root were ``/`` (the way
containerd and Go's ``filepath.Clean`` do): ``../x``, ``/../x`` and ``a/../../x``
all become ``/x``.  The applier runs chroot-ed into the target, so even a path
that resolves through symlinks can never leave the root; cleaning only makes
the names the layer means explicit.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal

from ember.unpack.errors import InvalidLayer

WHITEOUT_PREFIX = ".wh."
#: AUFS-internal names (``.wh..wh.plnk``, ``.wh..wh.aufs``): never part of the image
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"


def _display(name: str) -> str:
    return repr(name[:200])


def clean(name: str, what: str = "entry") -> str:
    """The absolute path (inside the root) a tar name refers to; ``/`` is the root itself."""
    if "\x00" in name:
        raise InvalidLayer(f"layer {what} {_display(name)} contains a NUL byte")
    # "/" + lstrip avoids POSIX's special '//' prefix surviving normpath.
    return posixpath.normpath("/" + name.lstrip("/"))


@dataclass(frozen=True)
class Whiteout:
    kind: Literal["opaque", "file", "meta"]
    #: for "opaque": the directory whose lower children are hidden;
    #: for "file": the path to delete; for "meta": the ignored entry itself
    path: str


def whiteout_of(path: str, name: str) -> Whiteout | None:
    """Classify a cleaned entry path; None when it is not a whiteout at all."""
    parent, base = posixpath.split(path)
    if "/" + WHITEOUT_META_PREFIX in parent + "/":
        return Whiteout("meta", path)  # anything inside an AUFS metadata directory
    if not base.startswith(WHITEOUT_PREFIX):
        return None
    if base == OPAQUE_WHITEOUT:
        return Whiteout("opaque", parent)
    if base.startswith(WHITEOUT_META_PREFIX):
        return Whiteout("meta", path)
    target = base[len(WHITEOUT_PREFIX):]
    if target in ("", ".", ".."):
        raise InvalidLayer(f"invalid whiteout entry {_display(name)}: it names no file")
    return Whiteout("file", posixpath.join(parent, target))


def parents(path: str) -> list[str]:
    """``/a/b/c`` -> ``['/a', '/a/b']`` (the directories that must exist for ``path``)."""
    out: list[str] = []
    parent = posixpath.dirname(path)
    while parent != "/":
        out.append(parent)
        parent = posixpath.dirname(parent)
    out.reverse()
    return out
