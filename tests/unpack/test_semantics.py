"""OCI layer semantics (image-spec layer.md) applied onto a real directory."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

import pytest

from ember.unpack import InvalidLayer, UnpackError
from tests.unpack.layers import (
    MTIME,
    Layers,
    dev,
    dir_,
    hard,
    opaque,
    reg,
    sym,
    tar_bytes,
    whiteout,
)


def test_files_dirs_symlinks_with_metadata(root: Path, layers: Layers) -> None:
    stats = layers.apply(root, [
        dir_("etc", mode=0o755, mtime=MTIME + 5),
        reg("etc/passwd", b"root:x:0:0\n", mode=0o644, mtime=MTIME + 1),
        reg("etc/shadow", b"secret\n", mode=0o640, uid=0, gid=42),
        dir_("home/app", mode=0o750, uid=1000, gid=1000),
        sym("bin", "usr/bin", mtime=MTIME + 2),
        sym("abs", "/etc/passwd"),
        sym("dangling", "../nowhere/at/all"),
    ])
    assert (root / "etc/passwd").read_bytes() == b"root:x:0:0\n"
    st = os.lstat(root / "etc/shadow")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 42)
    st = os.lstat(root / "home/app")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1000, 1000)
    # a missing parent is created root-owned 0755
    st = os.lstat(root / "home")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert os.readlink(root / "bin") == "usr/bin"
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert os.readlink(root / "dangling") == "../nowhere/at/all"
    assert os.lstat(root / "etc/passwd").st_mtime == MTIME + 1
    assert os.lstat(root / "bin").st_mtime == MTIME + 2
    # the directory's mtime is set after its children were created
    assert os.lstat(root / "etc").st_mtime == MTIME + 5
    assert (stats.files, stats.symlinks, stats.layers) == (2, 3, 1)


def test_special_mode_bits_survive_chown(root: Path, layers: Layers) -> None:
    layers.apply(root, [
        reg("bin/su", b"\x7fELF", mode=0o4755, uid=1000, gid=1000),
        reg("bin/wall", b"\x7fELF", mode=0o2755, uid=0, gid=5),
        dir_("tmp", mode=0o1777),
        dir_("srv/shared", mode=0o2775, uid=1000, gid=2000),
    ])
    assert stat.S_IMODE(os.lstat(root / "bin/su").st_mode) == 0o4755
    assert os.lstat(root / "bin/su").st_uid == 1000
    assert stat.S_IMODE(os.lstat(root / "bin/wall").st_mode) == 0o2755
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777
    st = os.lstat(root / "srv/shared")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2775, 1000, 2000)


def test_root_owned_entries_in_a_setgid_directory_of_another_group_stay_root_owned(
    root: Path, layers: Layers
) -> None:
    # New entries there get the directory's group from the kernel: an applier that
    # skipped chown for entries it took for owned as the layer says already (tried,
    # and dropped: docs/performance.md) would leave them in that group.
    shared = [dir_("srv/shared", mode=0o2775, uid=0, gid=2000)]
    inside = [
        reg("srv/plain", b"y"),  # first: root-owned as created
        reg("srv/shared/file", b"x"), sym("srv/shared/link", "file"), dir_("srv/shared/sub"),
        dev("srv/shared/fifo", tarfile.FIFOTYPE),
    ]  # fmt: skip
    layers.apply(root, inside[:1] + shared + inside[1:])  # the same layer
    for name in ("file", "link", "sub", "fifo"):
        st = os.lstat(root / "srv/shared" / name)
        assert (st.st_uid, st.st_gid) == (0, 0), name
    assert os.lstat(root / "srv/plain").st_gid == 0
    other = root.parent / "other-root"
    other.mkdir()
    layers.apply(other, shared, inside)  # the directory from a lower layer
    for name in ("file", "link", "sub", "fifo"):
        st = os.lstat(other / "srv/shared" / name)
        assert (st.st_uid, st.st_gid) == (0, 0), name
    # a directory made setgid after entries went into it
    third = root.parent / "third-root"
    third.mkdir()
    layers.apply(third, [reg("d/a", b"1"), dir_("d", mode=0o2775, gid=2000),
                         reg("d/b", b"2")])  # fmt: skip
    assert os.lstat(third / "d/b").st_gid == 0
    # a directory replaced by a symlink to a setgid one, after entries went into it
    fourth = root.parent / "fourth-root"
    fourth.mkdir()
    layers.apply(fourth, [dir_("d"), dir_("e", mode=0o2775, gid=2000)],
                 [reg("d/f1", b"1"), sym("d", "e"), reg("d/f2", b"2")])  # fmt: skip
    assert os.lstat(fourth / "e/f2").st_gid == 0


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL xattr (version 2): (tag, perm, id) entries."""
    return (2).to_bytes(4, "little") + b"".join(
        t.to_bytes(2, "little") + p.to_bytes(2, "little") + i.to_bytes(4, "little") for t, p, i in entries
    )


def test_posix_acls_set_the_mode_as_the_kernel_does(root: Path, layers: Layers) -> None:
    """An access ACL gives the file its owner, mask (else group) and other bits; one that
    says no more than the mode is not kept; a default ACL only on a directory."""
    user_obj, user, group_obj, mask, other = 1, 2, 4, 16, 32
    no_id = 0xFFFFFFFF  # what the kernel gives the unnamed entries
    extended = _acl((user_obj, 7, no_id), (user, 5, 1000), (group_obj, 4, no_id), (mask, 5, no_id),
                    (other, 0, no_id))
    plain = _acl((user_obj, 6, no_id), (group_obj, 4, no_id), (other, 4, no_id))
    layers.apply(root, [
        reg("extended", b"x", mode=0o600, xattrs={"system.posix_acl_access": extended}),
        reg("plain", b"y", mode=0o600, xattrs={"system.posix_acl_access": plain}),
        dir_("d", mode=0o700, xattrs={"system.posix_acl_default": extended}),
    ])
    assert stat.S_IMODE(os.lstat(root / "extended").st_mode) == 0o750
    assert os.getxattr(root / "extended", "system.posix_acl_access") == extended
    assert stat.S_IMODE(os.lstat(root / "plain").st_mode) == 0o644
    assert "system.posix_acl_access" not in os.listxattr(root / "plain")
    assert os.getxattr(root / "d", "system.posix_acl_default") == extended
    assert stat.S_IMODE(os.lstat(root / "d").st_mode) == 0o700
    with pytest.raises(UnpackError, match="posix_acl_default"):
        layers.apply(root, [reg("f", b"z", xattrs={"system.posix_acl_default": extended})])
    with pytest.raises(UnpackError, match="posix_acl_access"):
        layers.apply(root, [reg("g", b"z", xattrs={"system.posix_acl_access": b"\x02\0\0\0junk"})])


def test_xattrs_restored_after_chown(root: Path, layers: Layers) -> None:
    # a file capability (v2, cap_net_bind_service), binary and not UTF-8
    cap = bytes.fromhex("0100000200040000000000000000000000000000")
    layers.apply(root, [
        reg("bin/ping", b"x", mode=0o755, uid=0, gid=0, xattrs={"security.capability": cap, "user.a": b"1"}),
        dir_("d", xattrs={"user.dir": b"\xff\x00\xfe"}),
        reg("f", b"y", uid=1000, xattrs={"security.selinux": b"system_u:object_r:bin_t:s0"}),
    ])
    assert os.getxattr(root / "bin/ping", "security.capability") == cap
    assert os.getxattr(root / "bin/ping", "user.a") == b"1"
    assert os.getxattr(root / "d", "user.dir") == b"\xff\x00\xfe"
    # host-specific labels are not restored (as umoci does)
    assert "security.selinux" not in os.listxattr(root / "f")


def test_device_nodes_and_fifos(root: Path, layers: Layers) -> None:
    layers.apply(root, [
        dev("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
        dev("dev/loop9", tarfile.BLKTYPE, 7, 9, mode=0o660),
        dev("run/fifo", tarfile.FIFOTYPE, mode=0o620),
    ])
    st = os.lstat(root / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(root / "dev/loop9")
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 9)
    st = os.lstat(root / "run/fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620


def test_whiteout_removes_lower_file_and_tree(root: Path, layers: Layers) -> None:
    layers.apply(
        root,
        [reg("a/file", b"1"), reg("a/keep", b"k"), reg("b/deep/er/x", b"2"), reg("c", b"3")],
        [whiteout("a/file"), whiteout("b"), whiteout("never-existed")],
    )
    assert not (root / "a/file").exists()
    assert (root / "a/keep").read_bytes() == b"k"
    assert not (root / "b").exists()
    assert (root / "c").exists()
    assert not any(p.name.startswith(".wh.") for p in root.rglob("*"))


def test_whiteout_does_not_hide_same_layer_entry(root: Path, layers: Layers) -> None:
    layers.apply(root, [reg("x", b"lower")], [reg("x", b"upper"), whiteout("x")])
    assert (root / "x").read_bytes() == b"upper"


def test_opaque_whiteout_hides_lower_children_only(root: Path, layers: Layers) -> None:
    layers.apply(
        root,
        [reg("d/old", b"o"), reg("d/sub/older", b"o"), reg("d/sub/keepname", b"lower"), reg("other", b"x")],
        # entries of this layer before *and* after the opaque marker survive
        [dir_("d"), dir_("d/sub"), reg("d/sub/keepname", b"upper"), opaque("d"), reg("d/new", b"n")],
    )
    assert sorted(p.relative_to(root).as_posix() for p in (root / "d").rglob("*")) == [
        "d/new", "d/sub", "d/sub/keepname",
    ]
    assert (root / "d/sub/keepname").read_bytes() == b"upper"
    assert (root / "other").exists()


def test_opaque_whiteout_on_missing_directory_is_harmless(root: Path, layers: Layers) -> None:
    layers.apply(root, [opaque("nowhere"), reg("x", b"1")])
    assert (root / "x").exists()


def test_aufs_meta_entries_are_ignored(root: Path, layers: Layers) -> None:
    layers.apply(root, [reg(".wh..wh.plnk/123.456", b"x"), reg(".wh..wh.aufs", b""), reg("a", b"1")])
    assert sorted(p.name for p in root.iterdir()) == ["a"]


def test_replace_never_writes_through_a_lower_hardlink(root: Path, layers: Layers) -> None:
    layers.apply(
        root,
        [reg("a", b"original"), hard("b", "a")],
        [reg("a", b"changed")],
    )
    assert (root / "a").read_bytes() == b"changed"
    assert (root / "b").read_bytes() == b"original"
    assert os.lstat(root / "a").st_ino != os.lstat(root / "b").st_ino


def test_replace_never_writes_through_a_symlink(root: Path, layers: Layers) -> None:
    layers.apply(root, [reg("target", b"keep me"), sym("l", "/target")], [reg("l", b"new file")])
    assert (root / "target").read_bytes() == b"keep me"
    assert stat.S_ISREG(os.lstat(root / "l").st_mode)
    assert (root / "l").read_bytes() == b"new file"


def test_directory_over_directory_changes_metadata_only(root: Path, layers: Layers) -> None:
    layers.apply(
        root,
        [dir_("d", mode=0o755, xattrs={"user.old": b"1"}), reg("d/child", b"c")],
        [dir_("d", mode=0o700, uid=7, gid=8, xattrs={"user.new": b"2"})],
    )
    st = os.lstat(root / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 7, 8)
    assert (root / "d/child").read_bytes() == b"c"
    assert os.listxattr(root / "d") == ["user.new"]


def test_file_replaces_directory_and_directory_replaces_file(root: Path, layers: Layers) -> None:
    layers.apply(
        root,
        [reg("d/x", b"1"), reg("d/y/z", b"2"), reg("f", b"file")],
        [reg("d", b"now a file"), dir_("f"), reg("f/inside", b"i")],
    )
    assert (root / "d").read_bytes() == b"now a file"
    assert (root / "f/inside").read_bytes() == b"i"


def test_symlink_replaces_directory(root: Path, layers: Layers) -> None:
    layers.apply(root, [reg("d/x", b"1"), dir_("t")], [sym("d", "t")])
    assert os.readlink(root / "d") == "t"


def test_hardlinks_same_layer_lower_layer_and_absolute(root: Path, layers: Layers) -> None:
    layers.apply(
        root,
        [reg("usr/bin/python3.11", b"py", mode=0o755)],
        [
            hard("usr/bin/python3", "usr/bin/python3.11"),  # to a lower-layer file
            reg("etc/a", b"A"),
            hard("etc/b", "etc/a"),  # same layer
            hard("etc/c", "/etc/a"),  # absolute target (kaniko): inside the root
            hard("etc/d", "./etc/../etc/a"),
        ],
    )
    ino = os.lstat(root / "usr/bin/python3.11").st_ino
    assert os.lstat(root / "usr/bin/python3").st_ino == ino
    group = {os.lstat(root / f"etc/{n}").st_ino for n in "abcd"}
    assert len(group) == 1
    assert os.lstat(root / "etc/a").st_nlink == 4


def test_hardlink_to_a_symlink_links_the_symlink(root: Path, layers: Layers) -> None:
    layers.apply(root, [sym("s", "/etc/passwd"), hard("h", "s")])
    assert os.readlink(root / "h") == "/etc/passwd"
    assert os.lstat(root / "h").st_ino == os.lstat(root / "s").st_ino


def test_hardlink_to_missing_target_is_refused(root: Path, layers: Layers) -> None:
    with pytest.raises(InvalidLayer, match="does not exist"):
        layers.apply(root, [hard("h", "missing")])


def test_root_directory_entry_sets_root_metadata(root: Path, layers: Layers) -> None:
    layers.apply(root, [dir_("./", mode=0o711, mtime=MTIME), reg("./x", b"1")])
    st = os.lstat(root)
    assert stat.S_IMODE(st.st_mode) == 0o711
    assert st.st_mtime == MTIME


def test_long_and_non_ascii_names(root: Path, layers: Layers) -> None:
    long_dir = "d" * 120 + "/" + "e" * 150
    long_name = "n" * 250
    target = "t" * 200
    entries = [reg(f"{long_dir}/{long_name}", b"long"), sym("l", target), reg("ünïcödé ☃", b"u"),
               reg("raw-\udcff-bytes", b"r")]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        r = root / f"fmt{fmt}"
        r.mkdir()
        layers.apply(r, tar_bytes(entries, fmt))
        assert (r / long_dir / long_name).read_bytes() == b"long"
        assert os.readlink(r / "l") == target
        assert (r / "ünïcödé ☃").read_bytes() == b"u"
        assert os.path.exists(os.fsencode(r) + b"/raw-\xff-bytes")


def test_zero_runs_are_left_as_holes(root: Path, layers: Layers) -> None:
    data = b"head" + bytes(4 << 20) + b"tail" + bytes(1 << 20)
    stats = layers.apply(root, [reg("big", data)])
    st = os.lstat(root / "big")
    assert st.st_size == len(data)
    assert (root / "big").read_bytes() == data
    assert st.st_blocks * 512 < 256 * 1024
    assert stats.hole_bytes > 4 << 20


def test_empty_layer_and_end_without_zero_blocks(root: Path, layers: Layers) -> None:
    layers.apply(root, b"")
    raw = tar_bytes([reg("a", b"1")])
    # strip the end-of-archive zero blocks: Go's tar reader accepts this too
    body = raw[: 1024]
    layers.apply(root, body)
    assert (root / "a").read_bytes() == b"1"


def test_data_after_end_of_archive_is_ignored(root: Path, layers: Layers) -> None:
    raw = tar_bytes([reg("a", b"1")]) + b"garbage after the end" * 100
    layers.apply(root, raw)
    assert (root / "a").read_bytes() == b"1"


def test_stats_add_up_across_layers(root: Path, layers: Layers) -> None:
    stats = layers.apply(root, [reg("a", b"12345"), dir_("d")], [whiteout("a"), sym("s", "d")])
    assert (stats.layers, stats.files, stats.directories, stats.whiteouts, stats.symlinks) == (2, 1, 1, 1, 1)
    assert stats.entries == 4
    assert stats.bytes_written == 5
    assert len(stats.diff_ids) == 2


def test_whiteout_of_a_lower_directory_keeps_what_this_layer_put_inside(root: Path, layers: Layers) -> None:
    layers.apply(root, [reg("d/old", b"o"), reg("d/sub/older", b"o")], [reg("d/new", b"n"), whiteout("d")])
    assert sorted(p.relative_to(root).as_posix() for p in (root / "d").rglob("*")) == ["d/new"]


def test_opaque_keeps_this_layers_files_in_implicit_lower_subdirectories(root: Path, layers: Layers) -> None:
    layers.apply(
        root,
        [reg("d/sub/old", b"o"), reg("d/gone", b"g")],
        [reg("d/sub/new", b"n"), opaque("d")],  # no entry for d/sub itself in this layer
    )
    assert sorted(p.relative_to(root).as_posix() for p in (root / "d").rglob("*")) == ["d/sub", "d/sub/new"]



DEEP = "a/" * 1500  # a tree PATH_MAX allows, deeper than Python's default recursion limit


@pytest.mark.parametrize("upper", [
    [whiteout("a")],
    [reg("a/new", b"2"), opaque("a")],
    [reg("a", b"a file over the tree")],
])
def test_a_tree_as_deep_as_path_max_is_removed(upper: list, root: Path, layers: Layers) -> None:
    layers.apply(root, [reg(DEEP + "old", b"1")], upper)
    assert not (root / DEEP / "old").exists()
    assert not (root / "a/a").exists()


def test_a_tree_made_deeper_through_symlinks_is_removed(root: Path, layers: Layers) -> None:
    # three 2000-level trees, each reached through a symlink into the deepest directory
    # of the one before: 6000 levels below "a", deeper than any path can name
    n = 2000
    lower = [reg("a/" * n + "f", b"x"), sym("s1", "a/" * (n - 1) + "a"), reg("s1/" + "b/" * n + "f", b"x"),
             sym("s2", "s1/" + "b/" * (n - 1) + "b"), reg("s2/" + "c/" * n + "f", b"x")]
    layers.apply(root, lower, [whiteout("a")])
    assert sorted(p.name for p in root.iterdir()) == ["s1", "s2"]  # dangling now


# A directory's time is set at the end of its layer, by path: only where that path
# still leads to the directory its header was applied to.


def test_a_directory_whose_parent_became_a_file_later_in_the_layer(root: Path, layers: Layers) -> None:
    """Its time, set at the end, failed the layer ("Not a directory"); Docker and umoci
    apply it."""
    layers.apply(root, [dir_("a/x/z"), reg("a/x", b"file", mtime=1_000_000_000)])
    assert (root / "a/x").read_bytes() == b"file"
    assert os.lstat(root / "a/x").st_mtime == 1_000_000_000


def test_a_directory_whose_parent_became_a_symlink_loop_later_in_the_layer(root: Path, layers: Layers) -> None:
    """The layer failed: "Too many levels of symbolic links"."""
    layers.apply(root, [dir_("a/x/z"), sym("a/x", "x", mtime=1_000_000_000)])
    assert os.readlink(root / "a/x") == "x"
    assert os.lstat(root / "a/x").st_mtime == 1_000_000_000


def test_a_directory_whose_parent_became_a_symlink_leaves_its_target_alone(root: Path, layers: Layers) -> None:
    """Its time went to the directory the symlink points at, which no header named."""
    layers.apply(root, [dir_("b", mtime=1_000_000_000), dir_("b/z", mtime=1_000_000_000)])
    layers.apply(root, [dir_("a/x/z", mtime=1_600_000_000), sym("a/x", "/b")])
    assert os.stat(root / "b/z").st_mtime == 1_000_000_000
    # a directory made there after the symlink, in the same layer (maybe with the inode
    # number the first one freed), keeps its own header's time
    layers.apply(root, [dir_("c/x/z", mtime=1_600_000_000), sym("c/x", "/e"), dir_("e/z", mtime=1_000_000_000)])
    assert os.stat(root / "e/z").st_mtime == 1_000_000_000


def test_a_directory_replaced_by_a_file_leaves_the_file_its_time(root: Path, layers: Layers) -> None:
    layers.apply(root, [dir_("d", mtime=1_600_000_000), reg("d", b"f", mtime=1_000_000_000)])
    assert os.lstat(root / "d").st_mtime == 1_000_000_000
    # and one replaced by another directory gets the second header's time
    layers.apply(root, [dir_("e", mtime=1_600_000_000), reg("e", b"f"), dir_("e", mtime=1_000_000_000)])
    assert os.lstat(root / "e").st_mtime == 1_000_000_000


def test_a_directory_reached_through_a_lower_symlink_gets_its_time(root: Path, layers: Layers) -> None:
    """A merged /usr: "lib/modules" is usr/lib/modules, and still the directory its
    header made at the end of the layer."""
    layers.apply(root, [dir_("usr/lib"), sym("lib", "usr/lib")])
    layers.apply(root, [dir_("lib/modules", mtime=1_234_567_890), reg("lib/modules/f", b"1")])
    assert os.stat(root / "usr/lib/modules").st_mtime == 1_234_567_890
