"""Docker's copy-up: a new volume gets the image's files at its target.

``docker run -v NAME:/data IMAGE`` copies what IMAGE has at /data into volume
NAME when the volume is empty, owner and mode of /data itself included, unless
the mount says ``nocopy``.  ember does the same when ``ember run`` makes a
machine (not at later starts, as Docker copies when it creates a container),
for a volume no machine has had attached yet: a *pristine* one (a label on its
snapshot, set when it is made, cleared under its lock before the first VMM that
gets it starts).  That is stricter than Docker's "empty": a volume a machine had
and left empty is not copied into.  It is so because the host then never
mounts a file system a guest wrote: a guest owns its volume's disk, and could
write one that crashes the host kernel's ext4 (``errors=panic`` in its
superblock, a crafted directory block), or plant names that steer the copy.

The image's files are read by ``ember.unpack.pack`` in a child chroot-ed into the
image's read-only top snapshot and written by the layer applier chroot-ed into
a staging directory in the volume.  Where a copy stands is kept in another label
(``COPY_UP``), never in names inside the volume:

1. ``staging``: ``.ember-copy-up`` is made in the volume's root and filled, then
   synced;
2. ``moving``: it is renamed ``.ember-copy-up.done``, its entries are renamed into
   the volume's root, which takes the owner, mode and xattrs of the image's
   directory, and it is removed; the file system is synced;
3. the label goes, and so does the pristine one: the volume holds the image's
   files, and is never copied into again.

A copy killed in step 1 is thrown away (the staging directory removed) by the
next ``run`` or start that attaches the volume, a run then copying afresh; one
killed in step 2 is finished by it.  So no machine ever sees half a copy.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ember.snapshots import interrupts
from ember.snapshots.loop import syncfs
from ember.snapshots.snapshotter import Snapshotter
from ember.unpack.errors import UnpackError
from ember.unpack.pack import Packer, start_packer
from ember.unpack.sandbox import LayerStream, apply_streams
from ember.volumes.errors import VolumeError
from ember.volumes.spec import volume_key
from ember.volumes.store import COPY_UP, PRISTINE, VolumeInfo

STAGING = ".ember-copy-up"
STAGED = ".ember-copy-up.done"
_STAGING, _MOVING = "staging", "moving"


class _NoHash:
    """apply_streams hashes a layer for its DiffID; a copy has none to check."""

    def update(self, data: bytes | memoryview, /) -> None:
        pass


def copy_up(snap: Snapshotter, image_root_key: str, volume: VolumeInfo, target: str) -> bool:
    """Copy what committed snapshot ``image_root_key`` (an image's top) has at directory
    ``target`` into ``volume`` if it is pristine; whether it copied.  The caller holds
    the volume's lock (``Volumes.holding``) and no machine has it attached."""
    if not volume.pristine:
        return False
    key = volume_key(volume.name)
    if settle(snap, volume):
        return True  # an earlier run's copy, now finished
    with snap.mount(image_root_key) as image:
        packer = start_packer(image, target, skip=(STAGING, STAGED))
        if packer is None:
            return False
        try:
            snap.set_labels(key, {COPY_UP: _STAGING})
            with snap.mount(key) as vol:
                try:
                    _stage(vol, packer, volume)
                except BaseException:
                    with interrupts.deferred():  # (_stage removed what it staged)
                        snap.set_labels(key, {COPY_UP: None})
                    raise
                snap.set_labels(key, {COPY_UP: _MOVING})
                _move_in(vol)
        except BaseException:
            packer.kill()
            raise
    # copied: never again (a later run finds a volume that holds something)
    snap.set_labels(key, {COPY_UP: None, PRISTINE: None})
    return True


def settle(snap: Snapshotter, volume: VolumeInfo) -> bool:
    """Finish (``moving``) or throw away (``staging``) an interrupted copy into ``volume``;
    whether it finished one."""
    if volume.copy_up is None:
        return False
    key = volume_key(volume.name)
    finished = volume.copy_up == _MOVING
    with snap.mount(key) as vol:
        if finished:
            _move_in(vol)
        else:
            _remove_staging(vol)
            syncfs(vol)
    snap.set_labels(key, {COPY_UP: None, **({PRISTINE: None} if finished else {})})
    return finished


def attach(snap: Snapshotter, volume: VolumeInfo) -> None:
    """Before a machine first gets ``volume``: settle its copy-up, then it is no longer
    pristine (from now on a guest writes it, and the host does not mount it again)."""
    if not volume.pristine:
        return
    settle(snap, volume)
    snap.set_labels(volume_key(volume.name), {PRISTINE: None})


def _remove_staging(vol: Path) -> None:
    root = os.open(vol, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in (STAGING, STAGED):
            if _is_dir(root, name):
                shutil.rmtree(name, dir_fd=root)
    finally:
        os.close(root)


def _is_dir(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _stage(vol: Path, packer: Packer, volume: VolumeInfo) -> None:
    """The image's files into ``STAGING`` through the applier chroot-ed there, on the
    volume's disk before the caller moves on.  On any failure the staging directory is
    removed (the volume is left as it was) before the error goes on."""
    _remove_staging(vol)  # one a cleanup could not remove (the volume is ember's alone)
    os.mkdir(vol / STAGING, 0o700)
    try:
        apply_streams(
            vol / STAGING,
            [LayerStream(lambda: packer, _NoHash(), f"the image's files at {packer.target}")],
            check=lambda i: None,
            done=lambda i, counts, streamed: None,
        )
        packer.finish()
        syncfs(vol)
    except BaseException as e:
        with interrupts.deferred():  # a Ctrl-C now waits for the removal
            shutil.rmtree(vol / STAGING, ignore_errors=True)
        if isinstance(e, UnpackError):
            raise _copy_failed(e, volume, packer.target) from None
        if isinstance(e, OSError):
            raise VolumeError(f"cannot copy the image's files into volume {volume.name}: "
                              f"{e.strerror or e}") from None  # fmt: skip
        raise


def _copy_failed(e: UnpackError, volume: VolumeInfo, target: str) -> VolumeError:
    if "No space left on device" in e.message:
        return VolumeError(
            f"volume {volume.name} ({volume.size >> 20} MiB) has no room for the image's files at {target}",
            hint=f"make it larger (ember volume rm {volume.name}; ember volume create {volume.name} "
            f"--size ...), or mount it empty: -v {volume.name}:{target}:nocopy",
        )
    return VolumeError(f"cannot copy the image's files into volume {volume.name}: {e.message}")


def _move_in(vol: Path) -> None:
    """Step 2: the staged entries into the volume's root, which takes the staged
    directory's owner, mode and xattrs (not its times, as Docker's copy); what is left
    of it removed.  Safe to run again after being killed at any point."""
    root = os.open(vol, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not _is_dir(root, STAGED):
            if not _is_dir(root, STAGING):
                return  # moved in and removed: killed before the label went
            os.rename(STAGING, STAGED, src_dir_fd=root, dst_dir_fd=root)
        staged = os.open(STAGED, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
        try:
            for name in os.listdir(staged):
                try:
                    os.stat(name, dir_fd=root, follow_symlinks=False)
                except FileNotFoundError:
                    os.rename(name, name, src_dir_fd=staged, dst_dir_fd=root)
                # else: the root has it already (its lost+found), and keeps its own
            st = os.fstat(staged)
            os.chown(root, st.st_uid, st.st_gid)
            os.chmod(root, stat.S_IMODE(st.st_mode))  # after chown, which may clear setgid
            for name in os.listxattr(staged):
                os.setxattr(root, name, os.getxattr(staged, name))
        finally:
            os.close(staged)
        shutil.rmtree(STAGED, dir_fd=root)
    finally:
        os.close(root)
    syncfs(vol)
