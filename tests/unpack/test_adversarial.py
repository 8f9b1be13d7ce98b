"""Every adversarial case of ANCHORS.md "Unpacking layers": nothing outside the root changes.

Each case runs twice: all entries in one layer, and split across two layers
(the split point is right after the entry that sets the trap).  A sentinel
file next to the root (and reachable by its absolute host path) must keep its
content, mode and mtime, and no new file may appear outside the root, whether
the layer is applied or refused.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember.unpack import InvalidLayer, LayerSession, UnpackError
from tests.unpack.layers import E, Layers, dev, dir_, hard, opaque, reg, sym, whiteout

# every case with the applier child forked by the apply, and with a spare session
# child forked ahead (``ember agent``'s runners)
pytestmark = pytest.mark.usefixtures("each_applier_child")

SENTINEL_CONTENT = b"sentinel: must never change\n"
SENTINEL_MTIME = 1_234_567_890


@dataclass(frozen=True)
class Case:
    entries: Callable[[str, str], list[E]]  # (sentinel's absolute path, its directory) -> entries
    split: int  # entries[:split] form the first layer in the split variant
    refused: type[Exception] | None = None  # the error expected (None: applies cleanly)
    check: Callable[[Path, str], object] | None = None  # (root, sentinel path) -> extra checks inside the root


def _inside(rel: str, content: bytes = b"evil") -> Callable[[Path, str], None]:
    def check(root: Path, s: str) -> None:
        target = rel.format(s=s.lstrip("/"))
        assert (root / target).read_bytes() == content
    return check


CASES: dict[str, Case] = {
    "symlink to / then write through": Case(
        lambda s, d: [sym("l", "/"), reg(f"l{s}", b"evil")], 1, check=_inside("{s}")),
    "symlink to /../ then write through": Case(
        lambda s, d: [sym("l", "/../"), reg(f"l{s}", b"evil")], 1, check=_inside("{s}")),
    "symlink deep ../../.. then write through": Case(
        lambda s, d: [sym("l", "../" * 30), reg(f"l{s}", b"evil"), reg("l/sentinel", b"evil")], 1,
        check=_inside("sentinel")),
    "symlink /./../.. then write through": Case(
        lambda s, d: [sym("l", "/./../.."), reg(f"l{s}", b"evil")], 1, check=_inside("{s}")),
    "symlink to the sentinel then overwrite": Case(
        lambda s, d: [sym("l", s), reg("l", b"evil")], 1, check=_inside("l")),
    "symlink to the sentinel's directory then write through": Case(
        lambda s, d: [sym("l", d), reg("l/sentinel", b"evil")], 1, refused=InvalidLayer),
    "symlink to ../sentinel then overwrite through a hardlink": Case(
        lambda s, d: [sym("l", "../sentinel"), hard("h", "l"), reg("h", b"evil")], 2,
        check=lambda root, s: os.readlink(root / "l") == "../sentinel"),
    "symlink named ..": Case(lambda s, d: [sym("..", d), reg("../sentinel", b"evil")], 1,
                             refused=InvalidLayer),
    "symlink named .": Case(lambda s, d: [sym(".", d), reg("./sentinel", b"evil")], 1,
                            refused=InvalidLayer),
    "symlink with an empty name": Case(lambda s, d: [sym("", d), reg("sentinel", b"evil")], 1,
                                       refused=InvalidLayer),
    "symlink named a/.. (the root)": Case(lambda s, d: [sym("a/..", d), reg("sentinel", b"evil")], 1,
                                          refused=InvalidLayer),
    "directory replaced by a symlink out, then written through": Case(
        lambda s, d: [dir_("d"), reg("d/x", b"x"), sym("d", d), reg("d/sentinel", b"evil")], 3,
        refused=InvalidLayer),
    "directory replaced by a symlink up, then written through": Case(
        lambda s, d: [dir_("d"), sym("d", "../../../.."), reg("d/sentinel", b"evil")], 2,
        check=_inside("sentinel")),
    "relative hardlink out": Case(
        lambda s, d: [hard("h", "../sentinel"), reg("h", b"evil")], 1, refused=InvalidLayer),
    "hardlink out via ../../..": Case(
        lambda s, d: [hard("h", "../" * 20 + s.lstrip("/")), reg("h", b"evil")], 1, refused=InvalidLayer),
    "absolute hardlink to the host path": Case(
        lambda s, d: [hard("h", s), reg("h", b"evil")], 1, refused=InvalidLayer),
    "absolute hardlink resolved inside the root": Case(
        lambda s, d: [reg(s, b"inside"), hard("h", s)], 1, check=_inside("h", b"inside")),
    "down-and-out hardlink through a symlink": Case(
        lambda s, d: [sym("l", "../../.."), hard("h", "l/sentinel"), reg("h", b"evil")], 1,
        refused=InvalidLayer),
    "down-and-out hardlink through an absolute symlink": Case(
        lambda s, d: [sym("l", d), hard("h", "l/sentinel")], 1, refused=InvalidLayer),
    "hardlink to a symlink, then chmod": Case(
        lambda s, d: [sym("s", s), hard("h", "s", mode=0o777), hard("h2", "s", mode=0o4777),
                      dir_("h", mode=0o777)], 2,
        check=lambda root, s: os.path.isdir(root / "h")),
    "hardlink to a symlink, then write": Case(
        lambda s, d: [sym("s", s), hard("h", "s"), reg("h", b"evil")], 2, check=_inside("h")),
    "whiteout named .wh..": Case(lambda s, d: [reg("x", b"1"), reg(".wh..", b"")], 1, refused=InvalidLayer),
    "whiteout named .wh...": Case(lambda s, d: [reg("x", b"1"), reg("d/.wh...", b"")], 1,
                                  refused=InvalidLayer),
    "bare whiteout .wh.": Case(lambda s, d: [reg("x", b"1"), reg(".wh.", b"")], 1, refused=InvalidLayer),
    "whiteout through a symlinked parent": Case(
        lambda s, d: [sym("l", d), reg("l/.wh.sentinel", b"")], 1),
    "whiteout through a relative symlinked parent": Case(
        lambda s, d: [sym("l", "../" * 20 + d.lstrip("/")), reg("l/.wh.sentinel", b"")], 1),
    "whiteout through a symlink up": Case(
        lambda s, d: [reg("sentinel", b"in root"), sym("l", "../../.."), reg("l/.wh.sentinel", b"")], 2,
        check=lambda root, s: not (root / "sentinel").exists()),
    "opaque whiteout through a symlinked parent": Case(
        lambda s, d: [sym("l", d), opaque("l")], 1),
    "opaque whiteout of the root": Case(lambda s, d: [reg("x", b"1"), opaque("."), opaque("/../..")], 1),
    "whiteout named like a parent": Case(lambda s, d: [reg("x", b"1"), whiteout("../" + d.lstrip("/") + "/sentinel")], 1),
    "dead symlink as a parent": Case(
        lambda s, d: [sym("dead", d + "/no/such/dir"), reg("dead/file", b"evil")], 1, refused=InvalidLayer),
    "dead relative symlink as a parent": Case(
        lambda s, d: [sym("dead", "../../nonexistent"), reg("dead/sentinel", b"evil")], 1,
        refused=InvalidLayer),
    "name with leading /..": Case(lambda s, d: [reg("x", b"1"), reg("/../sentinel", b"evil")], 1,
                                  check=_inside("sentinel")),
    "name with leading ..": Case(lambda s, d: [reg("x", b"1"), reg("../sentinel", b"evil"),
                                               reg("../../" + s.lstrip("/"), b"evil")], 1,
                                 check=_inside("{s}")),
    "name with .. in the middle": Case(lambda s, d: [dir_("a"), reg("a/../../../sentinel", b"evil")], 1,
                                       check=_inside("sentinel")),
    "non-directory entry for the root": Case(lambda s, d: [reg("x", b"1"), reg("./", b"evil")], 1,
                                             refused=InvalidLayer),
    "symlink entry for the root": Case(lambda s, d: [reg("x", b"1"), sym("/", d)], 1, refused=InvalidLayer),
    "hardlink entry for the root": Case(lambda s, d: [reg("x", b"1"), hard(".", "x")], 1,
                                        refused=InvalidLayer),
    "device node through a symlinked parent": Case(
        lambda s, d: [sym("l", "../../.."), dev("l/sentinel", tarfile.CHRTYPE, 1, 3),
                      dev("l/fifo", tarfile.FIFOTYPE)], 1,
        check=lambda root, s: stat.S_ISCHR(os.lstat(root / "sentinel").st_mode)),
    "device node over a symlink to the sentinel": Case(
        lambda s, d: [sym("null", s), dev("null", tarfile.CHRTYPE, 1, 3, mode=0o666)], 1,
        check=lambda root, s: stat.S_ISCHR(os.lstat(root / "null").st_mode)),
    "chmod/chown of a directory through a symlink": Case(
        lambda s, d: [sym("d", d), dir_("d", mode=0o777, uid=1234)], 1,
        check=lambda root, s: os.path.isdir(root / "d") and not os.path.islink(root / "d")),
    "setuid bits survive chown": Case(
        lambda s, d: [sym("l", s), reg("su", b"x", mode=0o4755, uid=1000, gid=1000),
                      dir_("sg", mode=0o2775, uid=1000, gid=1000)], 1,
        check=lambda root, s: (stat.S_IMODE(os.lstat(root / "su").st_mode) == 0o4755
                               and stat.S_IMODE(os.lstat(root / "sg").st_mode) == 0o2775)),
    "xattr through a symlink": Case(
        lambda s, d: [sym("l", s), reg("l", b"x", xattrs={"user.evil": b"1"})], 1),
}


def _outside_state(tmp_path: Path, sentinel: Path) -> tuple[object, ...]:
    st = os.lstat(sentinel)
    listing = sorted(p.name for p in tmp_path.iterdir())
    return (sentinel.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns, st.st_ino,
            os.listxattr(sentinel), listing)


@pytest.mark.parametrize("layout", ["one-layer", "two-layers", "two-layers-session"])
@pytest.mark.parametrize("name", list(CASES))
def test_sentinel_outside_root_untouched(name: str, layout: str, tmp_path: Path, root: Path,
                                         layers: Layers) -> None:
    case = CASES[name]
    sentinel = tmp_path / "sentinel"
    sentinel.write_bytes(SENTINEL_CONTENT)
    os.chmod(sentinel, 0o644)
    os.utime(sentinel, (SENTINEL_MTIME, SENTINEL_MTIME))
    before = _outside_state(tmp_path, sentinel)

    entries = case.entries(str(sentinel), str(tmp_path))
    groups = [entries] if layout == "one-layer" else [entries[: case.split], entries[case.split:]]
    # the checks also see that the sentinel is reachable from inside: hostile
    # paths use its real absolute path
    with LayerSession() as session:
        use = session if layout.endswith("-session") else None  # one child, parked between layers
        if case.refused is not None:
            with pytest.raises(case.refused):
                layers.apply(root, *groups, session=use)
        else:
            layers.apply(root, *groups, session=use)
        if case.check is not None:
            result = case.check(root, str(sentinel))
            assert result is None or result
    assert _outside_state(tmp_path, sentinel) == before


def test_refusals_name_the_entry(root: Path, layers: Layers) -> None:
    with pytest.raises(InvalidLayer, match=r"'\.wh\.\.'"):
        layers.apply(root, [reg(".wh..", b"")])
    with pytest.raises(InvalidLayer, match="root directory itself"):
        layers.apply(root, [reg(".", b"")])


def test_error_is_an_unpack_error(root: Path, layers: Layers) -> None:
    # the refusal classes share one base the callers catch
    assert issubclass(InvalidLayer, UnpackError)
    with pytest.raises(UnpackError):
        layers.apply(root, [sym("dead", "/nope"), reg("dead/x", b"1")])
