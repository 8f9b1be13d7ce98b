"""Compare two root file system trees, entry by entry.

Used to check ember's unpacked / snapshotted roots against ``umoci unpack``
of the same image.  Everything is read with ``lstat`` and never follows a
symlink, so a hostile tree cannot lead the comparison outside its root.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TYPE_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char-device",
    stat.S_IFBLK: "block-device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class Entry:
    """What is compared for one path (relative to the tree's root)."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None  # regular files only: directory sizes depend on the file system
    sha256: str | None
    target: str | None  # symlink target
    rdev: tuple[int, int] | None  # device nodes
    xattrs: tuple[tuple[str, bytes], ...]
    mtime: int  # whole seconds: tar headers usually carry no more
    inode: tuple[int, int]  # (st_dev, st_ino), for hardlink groups
    nlink: int


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    # O_NOFOLLOW: the entry was an lstat-ed regular file; refuse if swapped for a link
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


def _entry(path: Path, with_xattrs: bool) -> Entry:
    st = os.lstat(path)
    fmt = stat.S_IFMT(st.st_mode)
    kind = _TYPE_NAMES.get(fmt, f"unknown({fmt:o})")
    is_reg = fmt == stat.S_IFREG
    is_dev = fmt in (stat.S_IFCHR, stat.S_IFBLK)
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if is_reg else None,
        sha256=_sha256(path) if is_reg else None,
        target=os.readlink(path) if fmt == stat.S_IFLNK else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if is_dev else None,
        xattrs=_xattrs(path) if with_xattrs else (),
        mtime=int(st.st_mtime),
        inode=(st.st_dev, st.st_ino),
        nlink=st.st_nlink,
    )


def _ignored(rel: str, ignore: Iterable[str]) -> bool:
    return any(rel == pat or rel.startswith(pat.rstrip("/") + "/") for pat in ignore)


def scan_tree(root: Path, ignore: Iterable[str] = (), xattrs: bool = True) -> dict[str, Entry]:
    """Every entry under ``root`` keyed by its relative path (``.`` is the root)."""
    ignore = tuple(ignore)
    entries: dict[str, Entry] = {".": _entry(root, xattrs)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        rel_base = base.relative_to(root)
        keep = []
        for name in sorted(dirnames) + sorted(filenames):
            rel = (rel_base / name).as_posix()
            if _ignored(rel, ignore):
                continue
            entries[rel] = _entry(base / name, xattrs)
            if name in dirnames:
                keep.append(name)
        # os.walk lists symlinks to directories in dirnames but does not descend
        # them with followlinks=False; prune ignored directories only.
        dirnames[:] = keep
    return entries


def _hardlink_groups(entries: dict[str, Entry]) -> dict[str, frozenset[str]]:
    """For each non-directory path with other names in the tree, the set of all its names."""
    by_inode: dict[tuple[int, int], set[str]] = {}
    for rel, e in entries.items():
        if e.kind != "dir":
            by_inode.setdefault(e.inode, set()).add(rel)
    groups: dict[str, frozenset[str]] = {}
    for names in by_inode.values():
        if len(names) > 1:
            frozen = frozenset(names)
            for n in names:
                groups[n] = frozen
    return groups


def _fmt_mode(m: int) -> str:
    return f"{m:04o}"


def compare_trees(
    a: Path,
    b: Path,
    ignore: Iterable[str] = ("lost+found",),
    *,
    mtimes: bool = False,
    xattrs: bool = True,
    root_meta: bool = False,
) -> list[str]:
    """Differences between trees ``a`` and ``b``, one readable line each; [] when equal.

    Compares paths, types, permission bits (incl. setuid/setgid/sticky),
    uid/gid, sizes and SHA-256 of regular files, symlink targets, device
    numbers, hardlink groups and extended attributes; mtimes (whole seconds,
    non-directories) when ``mtimes``.  ``ignore`` lists relative paths skipped
    with everything below them.  The root directory's own metadata is compared
    only with ``root_meta`` (a mount point's root often differs for
    reasons unrelated to the image).
    """
    ea = scan_tree(a, ignore, xattrs)
    eb = scan_tree(b, ignore, xattrs)
    diffs: list[str] = []
    for rel in sorted(ea.keys() - eb.keys()):
        diffs.append(f"only in a: {rel} ({ea[rel].kind})")
    for rel in sorted(eb.keys() - ea.keys()):
        diffs.append(f"only in b: {rel} ({eb[rel].kind})")
    for rel in sorted(ea.keys() & eb.keys()):
        x, y = ea[rel], eb[rel]
        if rel == "." and not root_meta:
            continue
        if x.kind != y.kind:
            diffs.append(f"{rel}: type {x.kind} != {y.kind}")
            continue
        if x.mode != y.mode:
            diffs.append(f"{rel}: mode {_fmt_mode(x.mode)} != {_fmt_mode(y.mode)}")
        if (x.uid, x.gid) != (y.uid, y.gid):
            diffs.append(f"{rel}: owner {x.uid}:{x.gid} != {y.uid}:{y.gid}")
        if x.size != y.size:
            diffs.append(f"{rel}: size {x.size} != {y.size}")
        elif x.sha256 != y.sha256:
            diffs.append(f"{rel}: content differs (sha256 {x.sha256} != {y.sha256})")
        if x.target != y.target:
            diffs.append(f"{rel}: symlink target {x.target!r} != {y.target!r}")
        if x.rdev != y.rdev:
            diffs.append(f"{rel}: device {x.rdev} != {y.rdev}")
        if x.xattrs != y.xattrs:
            diffs.append(f"{rel}: xattrs {dict(x.xattrs)} != {dict(y.xattrs)}")
        if mtimes and x.kind != "dir" and x.mtime != y.mtime:
            diffs.append(f"{rel}: mtime {x.mtime} != {y.mtime}")
    ga, gb = _hardlink_groups(ea), _hardlink_groups(eb)
    # one line per distinct pair of groups, not one per member
    reported: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
    for rel in sorted((ga.keys() | gb.keys()) & (ea.keys() & eb.keys())):
        sa = tuple(sorted(ga.get(rel, frozenset({rel}))))
        sb = tuple(sorted(gb.get(rel, frozenset({rel}))))
        if sa != sb and (sa, sb) not in reported:
            reported.add((sa, sb))
            diffs.append(f"{rel}: hardlink group {list(sa)} != {list(sb)}")
    return diffs


def assert_same_tree(a: Path, b: Path, ignore: Iterable[str] = ("lost+found",), **kw: bool) -> None:
    """Fail with every difference listed when ``a`` and ``b`` differ."""
    diffs = compare_trees(a, b, ignore, **kw)
    if diffs:
        shown = "\n  ".join(diffs[:200])
        more = f"\n  ... and {len(diffs) - 200} more" if len(diffs) > 200 else ""
        raise AssertionError(f"trees differ: {a} vs {b}:\n  {shown}{more}")


def umoci_unpack(layout: Path, tag: str, dest: Path) -> Path:
    """``umoci unpack --image LAYOUT:TAG DEST`` (as root); returns ``DEST/rootfs``.

    ``dest`` must not exist yet (umoci's rule).
    """
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)],
        check=True,
        capture_output=True,
    )
    return dest / "rootfs"
