"""Docker's copy-up: an empty volume gets the image's files at its target.

``docker run -v NAME:/data IMAGE`` copies what IMAGE has at /data into volume
NAME when the volume is empty, owner and mode of /data itself included, unless the mount says ``nocopy``; a volume that holds anything is
mounted as it is.  ember does the same when ``ember run`` makes a machine
(not at later starts, as Docker copies when it creates a container).

Empty means: nothing in the volume's root but an empty ``lost+found``
directory, which every new ext4 has.  The volume was written by a guest, so its
root is looked at and changed through descriptors only, never through a path
a symlink could bend.  The image's files are read by ``ember.unpack.pack`` in
a child chroot-ed into the image's (read-only) root file system and written by
the layer applier chroot-ed into a staging directory in the volume:

1. ``.ember-copy-up`` is made in the volume's root and filled;
2. it is renamed ``.ember-copy-up.done`` once its files are on the disk;
3. its entries are renamed into the volume's root, and the root takes the
   owner, mode and extended attributes of the image's directory;
4. the emptied staging directory is removed.

A copy killed during step 1 leaves a staging directory in an otherwise empty
volume: the next copy removes it and starts again.  One killed during step 3
leaves the ``.done`` one, which the next copy finishes.  Either way a volume
never looks populated before it is.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ember.snapshots.loop import syncfs
from ember.snapshots.snapshotter import Snapshotter
from ember.unpack.errors import UnpackError
from ember.unpack.pack import Packer, start_packer
from ember.unpack.sandbox import LayerStream, apply_streams
from ember.volumes.errors import VolumeError
from ember.volumes.spec import volume_key

STAGING = ".ember-copy-up"
STAGED = ".ember-copy-up.done"
_LOST_FOUND = "lost+found"


class _NoHash:
    """apply_streams hashes a layer for its DiffID; a copy has none to check."""

    def update(self, data: bytes | memoryview, /) -> None:
        pass


def copy_up(snap: Snapshotter, image_root_key: str, volume: str, target: str) -> bool:
    """Copy what committed snapshot ``image_root_key`` (an image's top) has at directory
    ``target`` into volume ``volume`` if that is empty; whether it copied.  The caller
    holds the volume's lock (``Volumes.holding``) and no machine has it attached."""
    with snap.mount(volume_key(volume)) as vol:
        root_fd = os.open(vol, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if _is_dir(root_fd, STAGED):
                _finish(root_fd)  # a copy killed while it moved its files in
                syncfs(vol)
                return True
            if not _empty(root_fd):
                return False
            with snap.mount(image_root_key) as image:
                packer = start_packer(image, target)
                if packer is None:
                    return False
                try:
                    _stage(vol, root_fd, packer, volume)
                except BaseException:
                    packer.kill()
                    raise
            os.rename(STAGING, STAGED, src_dir_fd=root_fd, dst_dir_fd=root_fd)
            _finish(root_fd)
            syncfs(vol)
            return True
        finally:
            os.close(root_fd)


def _is_dir(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _empty(root_fd: int) -> bool:
    """Nothing in the root but an empty ``lost+found`` directory (and a staging
    directory left by a copy that was killed: removed here)."""
    for name in os.listdir(root_fd):
        if name == _LOST_FOUND and _is_dir(root_fd, name):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
            try:
                if os.listdir(fd):
                    return False
            finally:
                os.close(fd)
        elif name != STAGING or not _is_dir(root_fd, name):
            return False
    if _is_dir(root_fd, STAGING):
        shutil.rmtree(STAGING, dir_fd=root_fd)
    return True


def _stage(vol: Path, root_fd: int, packer: Packer, volume: str) -> None:
    """The image's files into ``STAGING``, through the applier chroot-ed there, and on
    the volume's disk before the staging directory is renamed."""
    os.mkdir(STAGING, 0o700, dir_fd=root_fd)
    try:
        apply_streams(
            vol / STAGING,
            [LayerStream(lambda: packer, _NoHash(), f"the image's files at {packer.target}")],
            check=lambda i: None,
            done=lambda i, counts, streamed: None,
        )
        packer.finish()
        syncfs(vol)
    except UnpackError as e:
        # a partial copy is no copy: the volume is left empty, as it was
        shutil.rmtree(STAGING, dir_fd=root_fd, ignore_errors=True)
        if "No space left on device" in e.message:
            raise VolumeError(
                f"volume {volume} has no room for the image's files at {packer.target}",
                hint=f"use a larger volume (ember volume create {volume} --size ...), or "
                f"-v {volume}:{packer.target}:nocopy to mount it empty",
            ) from None
        raise VolumeError(f"cannot copy the image's files into volume {volume}: {e.message}") from None


def _finish(root_fd: int) -> None:
    """Move the staged entries into the volume's root and give the root the staged
    directory's owner, mode and xattrs (not its times, as Docker's copy: the moves
    changed them); remove what is left of it.  Safe to run
    again after being killed at any point."""
    staged = os.open(STAGED, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
    try:
        for name in os.listdir(staged):
            try:
                os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            except FileNotFoundError:
                os.rename(name, name, src_dir_fd=staged, dst_dir_fd=root_fd)
            # else: the root has it already (lost+found), and keeps its own
        st = os.fstat(staged)
        os.chown(root_fd, st.st_uid, st.st_gid)
        os.chmod(root_fd, stat.S_IMODE(st.st_mode))  # after chown, which may clear setgid
        for name in os.listxattr(staged):
            os.setxattr(root_fd, name, os.getxattr(staged, name))
    finally:
        os.close(staged)
    shutil.rmtree(STAGED, dir_fd=root_fd)
