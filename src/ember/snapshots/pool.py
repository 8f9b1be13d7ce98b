"""The copy-on-write pool: where snapshot disks live.

If ``$EMBER_HOME/snapshots`` is on a file system with reflinks (XFS with
reflink=1, btrfs), the pool is the plain directory ``snapshots/pool``.
Otherwise ember makes a sparse file ``snapshots/pool.img``, formats it XFS with
reflink and loop-mounts it on ``snapshots/pool`` (the way one tests an LVM thin
pool on a loop file); after a reboot the next ember command mounts it again.
The decision is recorded in ``snapshots/pool.json`` so it is taken once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ember import jsonutil
from ember.fsutil import atomic_write
from ember.home import Home
from ember.locks import FileLock
from ember.snapshots import system
from ember.snapshots.backends import Backend, backend_by_name, reflink_works
from ember.snapshots.config import DEFAULT_POOL_SIZE, GiB, SnapshotConfig
from ember.snapshots.errors import PoolError, SnapshotError

log = logging.getLogger("ember.snapshots")

NATIVE = "native"
LOOPFILE = "loopfile"


@dataclass(frozen=True)
class Pool:
    base: Path  # $EMBER_HOME/snapshots (real path)
    root: Path  # the pool's data directory (a mount point for LOOPFILE)
    kind: str
    reflink: bool
    backend: Backend
    image: Path | None  # pool.img for LOOPFILE
    created: bool = False  # this open made the pool

    @property
    def locks(self) -> Path:
        return self.base / "locks"

    @property
    def leases(self) -> Path:
        return self.base / "leases"

    @property
    def mnt(self) -> Path:
        return self.base / "mnt"


def _paths(home: Home) -> tuple[Path, Path, Path, Path]:
    home.snapshots.mkdir(parents=True, exist_ok=True, mode=0o700)
    base = Path(os.path.realpath(home.snapshots))
    return base, base / "pool", base / "pool.img", base / "pool.json"


def pool_exists(home: Home) -> bool:
    """Whether a pool was set up in ``home`` (without making anything): commands that only
    look (``snapshot ls``, ``gc``) have nothing to do without one, and must not format and
    mount a pool file to find that out."""
    base = home.snapshots
    return (base / "pool.json").exists() or (base / "pool.img").exists()


def private_dir(path: Path) -> Path:
    """``path``, a directory of ember's own, made if missing.  PoolError when something
    else is there: through a symlink, recovery would empty another directory (``trash/``),
    mount over one (``mnt/``, ``pool/``) or remove its empty subdirectories."""
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise PoolError(
            f"{path} is not a directory (a symlink or a file where ember keeps snapshot "
            "state): move it away"
        )
    return path


def open_pool(home: Home, config: SnapshotConfig) -> Pool:
    base, root, image, state_file = _paths(home)
    for d in (root, base / "locks", base / "leases", base / "mnt"):
        private_dir(d)
    with FileLock(base / "pool.lock"):
        state = _read_state(state_file)
        created = False
        if state is None:
            if image.is_file():
                # pool.json lost (or a crash right after the pool file was made): the
                # pool file is the authority, never format over it
                state = {"kind": LOOPFILE, "reflink": True, "created": time.time()}
            else:
                _refuse_orphaned_mount(root)
                state = _create(base, root, image, config)
                created = True
            atomic_write(state_file, json.dumps(state).encode())
        kind, reflink = str(state["kind"]), bool(state["reflink"])
        if kind == LOOPFILE:
            _ensure_mounted(image, root)
    backend = _choose_backend(config, reflink)
    return Pool(base, root, kind, reflink, backend, image if kind == LOOPFILE else None, created)


def _refuse_orphaned_mount(root: Path) -> None:
    """A pool left mounted after its files were removed (``rm -rf`` of the state directory
    cannot remove the mount point): its XFS would pass for a native pool with reflinks,
    and what ember then stored would live in a deleted file, gone at the next unmount."""
    for m in system.mounts():
        if m.mountpoint != root:
            continue
        for lo in system.loop_devices():
            if (lo.major, lo.minor) == (m.major, m.minor) and lo.backing_file.endswith(" (deleted)"):
                raise PoolError(
                    f"{root} is still mounted from a deleted pool file ({lo.backing_file}): "
                    f"was the state directory removed while it was mounted?",
                    hint=f"unmount it (umount {root}) and run the command again",
                )


def _read_state(state_file: Path) -> dict[str, object] | None:
    try:
        state = jsonutil.loads(state_file.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PoolError(
            f"cannot read {state_file}: {e} (remove it to let ember decide again)"
        ) from e
    if (
        not isinstance(state, dict)
        or state.get("kind") not in (NATIVE, LOOPFILE)
        or not isinstance(state.get("reflink"), bool)
    ):
        raise PoolError(
            f"{state_file} is not a pool description (remove it to let ember decide again)"
        )
    return state


def _choose_backend(config: SnapshotConfig, reflink: bool) -> Backend:
    if config.backend == "copy" or (config.backend == "auto" and not reflink):
        return backend_by_name("copy")
    if not reflink:
        raise PoolError(
            "snapshots.backend is reflink but the snapshot pool has no reflinks (use auto or copy)"
        )
    return backend_by_name("reflink")


def _create(base: Path, root: Path, image: Path, config: SnapshotConfig) -> dict[str, object]:
    if reflink_works(root):
        return {"kind": NATIVE, "reflink": True, "created": time.time()}
    if config.backend == "copy":
        return {"kind": NATIVE, "reflink": False, "created": time.time()}
    size = config.pool_size or _default_pool_size(base)
    try:
        _make_pool_file(image, size)
        _ensure_mounted(image, root)
    except SnapshotError as e:
        if config.backend == "reflink":
            raise PoolError(f"cannot create the reflink pool {image}: {e}") from e
        log.warning("cannot create a reflink pool (%s); falling back to the slow copy backend", e)
        return {"kind": NATIVE, "reflink": False, "created": time.time()}
    return {"kind": LOOPFILE, "reflink": True, "size": size, "created": time.time()}


def _default_pool_size(base: Path) -> int:
    """64 GiB sparse, but never more than 90% of the free space under it: an
    over-committed pool file would turn a full host disk into XFS I/O errors."""
    free = shutil.disk_usage(base).free
    size = min(DEFAULT_POOL_SIZE, int(free * 0.9)) // GiB * GiB
    if size < GiB:
        raise PoolError(f"not enough free space under {base} for a snapshot pool (1 GiB needed)")
    return size


def _make_pool_file(image: Path, size: int) -> None:
    tmp = image.with_name(image.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "xb") as f:
        f.truncate(size)
    try:
        system.run(
            ["mkfs.xfs", "-q", "-m", "reflink=1", "-L", "ember-pool", tmp],
            f"cannot format the snapshot pool {image}",
        )
        os.rename(tmp, image)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _ensure_mounted(image: Path, root: Path) -> None:
    for m in system.mounts():
        if m.mountpoint != root:
            continue
        # the kernel names a loop device's file by its resolved path (a pool.img moved
        # to a bigger disk and symlinked back was "mounted from another device")
        backing = os.path.realpath(image)
        ours = [lo for lo in system.loop_devices() if lo.backing_file == backing]
        if any((lo.major, lo.minor) == (m.major, m.minor) for lo in ours):
            return
        raise PoolError(f"{root} is mounted from {m.source}, not from the pool file {image}")
    if not image.is_file():
        raise PoolError(
            f"the snapshot pool file {image} is missing (remove {image.parent}/pool.json to start over)"
        )
    log.info("mounting snapshot pool %s", image)
    system.mount_image(image, root, readonly=False, fstype="xfs", share=True)


def close_pool(home: Home) -> None:
    """Unmount every ember mount under the snapshot directory and the pool itself.

    No ember command calls it: the tests and the benchmarks (bench/) do, when they are
    done with a state directory, and so may whoever takes a host out of service.
    """
    base = Path(os.path.realpath(home.snapshots))
    for m in system.mounts_under(base):
        system.unmount(m.mountpoint)
    for lo in system.loops_backed_under(base):
        with contextlib.suppress(SnapshotError):
            system.detach_loop(lo.device)
        system.wait_loop_released(lo.major, lo.minor, lo.backing_file)
