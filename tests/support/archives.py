"""Rewriting tar archives in tests (docker save archives with another manifest.json or
index.json, members added): tarfile, whose writing is safe; reading ember's own
archives only."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def rewrite_tar(
    src: Path, dest: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None
) -> None:
    """``src`` copied to ``dest`` (which may be ``src``) with the members named in
    ``replace`` holding those bytes instead, and the members of ``add`` appended."""
    out = dest.with_name(dest.name + ".writing")
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        for member in tin.getmembers():
            if member.name in replace:
                data = replace[member.name]
                member.size = len(data)
                tout.addfile(member, io.BytesIO(data))
            else:
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
        for name, data in (add or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    out.replace(dest)
