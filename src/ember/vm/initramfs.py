"""The guest's initramfs: ember-init plus exactly the kernel modules it needs.

``base_initramfs(home, kernel)`` builds (once per kernel and ember-init binary) a cpio
archive holding::

    init                    ember-init (the kernel runs /init as PID 1)
    dev/console             so the kernel can give init a console before devtmpfs
    ember/modules/NAME.ko   uncompressed, in dependency order listed in
    ember/modules/order     (init loads them with finit_module, then deletes them)

``config_archive(runconfig)`` is the small second archive with ``ember/config``;
``write_machine_initrd`` puts the two together into the one file QEMU's ``-initrd``
takes (the kernel unpacks concatenated archives in order).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.fsutil import atomic_write, reflink, stale_temps
from ember.home import Home
from ember.vm.cpio import CpioWriter
from ember.vm.errors import InitNotBuilt, KernelError, ModuleNotFoundInKernel
from ember.vm.kernel import KernelInfo, decompress_bounded
from ember.vm.runconfig import RunConfig

#: what every guest needs: the virtio-mmio transport (microvm), block, net, the
#: serial ports of the host channel, the root file system, and ext4's checksum
#: (its crc32c is requested through the crypto API, which cannot modprobe in the guest)
REQUIRED_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "ext4",
    "crc32c_generic",
)
#: shipped (when the kernel has them) but loaded only when a run config's ``module``
#: records ask, in the order ``extra_modules`` gives: each costs boot time under TCG
OPTIONAL_MODULES = ("vmw_vsock_virtio_transport", "virtio_rng")
#: bump when the archive layout changes, so cached archives are rebuilt
LAYOUT_VERSION = 1
_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
_REPO_INIT = Path(__file__).resolve().parents[3] / "init" / "build" / "ember-init"


def find_init(path: Path | None = None) -> Path:
    """ember-init: ``path``, else ``$EMBER_INIT``, else the repository's ``init/build``."""
    candidate = path or (Path(os.environ["EMBER_INIT"]) if os.environ.get("EMBER_INIT") else None)
    candidate = candidate or _REPO_INIT
    if not candidate.is_file():
        raise InitNotBuilt(f"ember-init not found at {candidate}", hint="run: make init")
    return candidate


# ---- module resolution (pure over the modules.dep text) ----------------------------------


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass(frozen=True)
class ModuleIndex:
    #: name -> path relative to the modules dir
    paths: dict[str, str]
    #: name -> names it depends on
    deps: dict[str, tuple[str, ...]]
    builtin: frozenset[str]

    @classmethod
    def parse(cls, modules_dep: str, modules_builtin: str = "") -> ModuleIndex:
        paths: dict[str, str] = {}
        deps: dict[str, tuple[str, ...]] = {}
        for line in modules_dep.splitlines():
            target, sep, rest = line.partition(":")
            if not sep or not target.strip():
                continue
            name = module_name(target.strip())
            paths[name] = target.strip()
            deps[name] = tuple(module_name(d) for d in rest.split())
        builtin = frozenset(module_name(line.strip()) for line in modules_builtin.splitlines())
        return cls(paths, deps, builtin - frozenset(paths))

    def load_order(self, required: Iterable[str], optional: Iterable[str] = ()) -> list[str]:
        """Modules to load, each after everything it depends on; built-ins left out."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in seen or name in self.builtin:
                return
            if name in chain:
                raise KernelError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
            if name not in self.paths:
                raise ModuleNotFoundInKernel(f"kernel module {name} not found in modules.dep")
            for dep in self.deps[name]:
                visit(dep, chain + (name,))
            seen.add(name)
            order.append(name)

        for name in required:
            visit(name.replace("-", "_"), ())
        for name in optional:
            n = name.replace("-", "_")
            if n in self.paths:
                visit(n, ())
        return order


#: far above any module (Debian's largest, amdgpu, is ~20 MB unpacked): what a
#: --kernel-modules file decompresses to past this is refused, not held in memory
MAX_MODULE_BYTES = 256 << 20


def read_module(path: Path) -> bytes:
    """A module file's ELF bytes, decompressed (finit_module wants plain .ko here)."""
    data = path.read_bytes()
    if path.name.endswith((".xz", ".zst", ".gz")):
        return decompress_bounded(data, MAX_MODULE_BYTES, f"module {path}")
    return data


_SIG_MAGIC = b"~Module signature appended~\n"
_SIG_INFO_SIZE = 12  # struct module_signature: 8 bytes of ids and lengths, then __be32 sig_len


def strip_signature(module: bytes) -> bytes:
    """The module without its appended signature (unchanged when it has none).

    Why: under TCG the guest spends about half its module-loading time (~0.5 s of
    ~1 s here) hashing and RSA-verifying signatures.  apt already verified the
    package these modules came from, and an unsigned module loads on a kernel
    that does not enforce signatures (it is only tainted 'E').  Only done for
    kernels whose config says signatures are not forced (see ``_may_strip``)."""
    if not module.endswith(_SIG_MAGIC):
        return module
    end = len(module) - len(_SIG_MAGIC)
    if end < _SIG_INFO_SIZE:
        raise KernelError("module signature trailer is truncated")
    sig_len = int.from_bytes(module[end - 4 : end], "big")
    start = end - _SIG_INFO_SIZE - sig_len
    if start < 4 or module[:4] != b"\x7fELF":
        raise KernelError("module signature length points outside the module")
    return module[:start]


def _may_strip(kernel: KernelInfo) -> bool:
    """Strip signatures only when the kernel's own config shows they are not enforced."""
    config = kernel.vmlinux.parent / "config"
    try:
        text = config.read_text(errors="replace")
    except OSError:
        return False
    return "CONFIG_MODULES=y" in text and "CONFIG_MODULE_SIG_FORCE=y" not in text


# ---- archives -------------------------------------------------------------------------


def build_base_archive(
    init_binary: bytes, modules: Sequence[tuple[str, bytes]], load: Sequence[str]
) -> bytes:
    """``modules`` are shipped; ``load`` (a subset, in order) goes to the order file."""
    w = CpioWriter()
    for d in ("dev", "proc", "sys", "newroot", "ember", "ember/modules"):
        w.add_dir(d)
    w.add_device("dev/console", "c", 5, 1, 0o600)
    w.add_file("init", init_binary, 0o755)
    for name, data in modules:
        w.add_file(f"ember/modules/{name}.ko", data, 0o644)
    w.add_file("ember/modules/order", "".join(f"{n}\n" for n in load).encode(), 0o644)
    return w.getvalue()


def extra_modules(kernel: KernelInfo, wanted: Iterable[str]) -> tuple[str, ...]:
    """Run config ``modules`` for optional features (e.g. ``vmw_vsock_virtio_transport``):
    the wanted modules and their dependencies not already loaded at boot, in load order."""
    index = _module_index(kernel)
    if index is None:
        return ()
    base = set(index.load_order(REQUIRED_MODULES))
    wanted = list(wanted)
    unknown = [w for w in wanted if w.replace("-", "_") not in OPTIONAL_MODULES]
    if unknown:
        raise ModuleNotFoundInKernel(
            f"module(s) {', '.join(unknown)} are not in the initramfs "
            f"(optional ones: {', '.join(OPTIONAL_MODULES)})"
        )
    return tuple(n for n in index.load_order(wanted) if n not in base)


def config_archive(runconfig: RunConfig) -> bytes:
    """The per-machine second archive: ``ember/config`` (docs/run-config.md)."""
    w = CpioWriter()
    w.add_dir("ember")
    w.add_file("ember/config", runconfig.render(), 0o600)
    return w.getvalue()


def _stat_key(path: Path) -> str:
    # by the real file: state dirs that share a kernel directory share its archives
    real = path.resolve()
    st = real.stat()
    return f"{real}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def base_initramfs(home: Home, kernel: KernelInfo, init: Path | None = None) -> Path:
    """The cached base archive for this kernel and ember-init (built on first use).

    The cache key is made of the inputs' identities (path, inode, size, mtime) rather
    than their contents, so a warm start neither hashes ember-init nor parses
    modules.dep (that took ~50 ms); the archive itself is reproducible from them."""
    init_path = find_init(init)
    key = hashlib.sha256()
    parts = [str(LAYOUT_VERSION), kernel.version, _stat_key(init_path)]
    if kernel.modules_dir is not None:
        parts.append(_stat_key(kernel.modules_dir / "modules.dep"))
    strip = _may_strip(kernel)
    parts += list(REQUIRED_MODULES) + ["|"] + list(OPTIONAL_MODULES) + [f"strip={strip}"]
    for part in parts:
        key.update(part.encode() + b"\0")
    dest = home.initramfs_cache / f"{kernel.version}-{key.hexdigest()[:16]}.cpio"
    if dest.is_file():
        # (not touched: its mtime is part of the template shape's key, vm/template.py;
        # its use is noted beside it, for _prune)
        _note_use(dest)
        return dest
    index = _module_index(kernel)
    load = index.load_order(REQUIRED_MODULES) if index else []
    names = index.load_order(REQUIRED_MODULES, OPTIONAL_MODULES) if index else []
    modules: list[tuple[str, bytes]] = []
    if index is not None and kernel.modules_dir is not None:
        for n in names:
            data = read_module(kernel.modules_dir / index.paths[n])
            modules.append((n, strip_signature(data) if strip else data))
    archive = build_base_archive(init_path.read_bytes(), modules, load)
    atomic_write(dest, archive, mode=0o644)
    _prune(dest)
    return dest


def unused_archives(home: Home, version: str) -> list[Path]:
    """The cached base archives of kernel ``version`` not made or used for
    ``PRUNE_AFTER``, as ``_prune`` judges them (``ember gc`` removes them with their
    kernel, ``remove_archive``; a machine keeps its own hard link,
    ``pin_base_initramfs``).  Not those just made or used: another kernel of the same
    version (a custom one whose modules' directory has that name) may be about to link
    one; an older one it loses is made again when needed."""
    cache = home.initramfs_cache
    if cache.is_symlink() or not cache.is_dir():
        return []
    now = time.time()
    found = []
    for p in cache.glob(f"{glob.escape(version)}-*.cpio"):
        key = p.name[len(version) + 1 : -len(".cpio")]
        if not re.fullmatch(r"[0-9a-f]{16}", key):
            continue
        with contextlib.suppress(OSError):
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and now - _last_use(p, st) > PRUNE_AFTER:
                found.append(p)
    return sorted(found)


#: archives of the same kernel not built or used for this long are from an older
#: ember-init or modules dir and are not asked for any more; the delay leaves alone any
#: archive a machine being created right now may still be copying
PRUNE_AFTER = 3600.0


def _use_mark(archive: Path) -> Path:
    return archive.with_name(archive.name + ".used")


def _note_use(archive: Path) -> None:
    """Note that ``archive`` is in use (the mtime of a mark beside it: the archive's
    own is part of the template shape's key).  Judged by when it was built, an archive
    in use was pruned whenever another of its kernel version was built (another
    ember-init, ``EMBER_INIT``, or a custom kernel of that version's name), and was
    built again, which made every template of it stale."""
    mark = _use_mark(archive)
    try:
        os.utime(mark)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError:
        pass  # a read-only cache: the archive is rebuilt if it is pruned


def _last_use(archive: Path, st: os.stat_result) -> float:
    """When ``archive`` (whose stat is ``st``) was last built or used."""
    try:
        return max(st.st_mtime, _use_mark(archive).stat().st_mtime)
    except OSError:
        return st.st_mtime


def remove_archive(archive: Path) -> None:
    """Remove a cached base archive and its use mark."""
    archive.unlink()
    with contextlib.suppress(FileNotFoundError):
        _use_mark(archive).unlink()


def _prune(keep: Path) -> None:
    version = keep.name.rsplit("-", 1)[0]
    now = time.time()
    stale = [
        old
        for old in keep.parent.glob(f"{version}-*.cpio")
        if old != keep and old.name.rsplit("-", 1)[0] == version
    ]
    with contextlib.suppress(OSError):  # temp files of writers killed half-way
        stale_temps(keep.parent, PRUNE_AFTER, remove=True, follow=True, now=now)
    for old in stale:
        with contextlib.suppress(OSError):
            if now - _last_use(old, old.stat()) > PRUNE_AFTER:
                remove_archive(old)
    for mark in keep.parent.glob(f"{version}-*.cpio.used"):
        with contextlib.suppress(OSError):  # the mark of an archive gc removed
            if not mark.with_suffix("").exists() and now - mark.stat().st_mtime > PRUNE_AFTER:
                mark.unlink()


def _module_index(kernel: KernelInfo) -> ModuleIndex | None:
    if kernel.modules_dir is None:
        return None  # a kernel with everything built in
    dep = kernel.modules_dir / "modules.dep"
    builtin = kernel.modules_dir / "modules.builtin"
    return ModuleIndex.parse(dep.read_text(), builtin.read_text() if builtin.is_file() else "")


def _copy_in_kernel(src: int, dst: int, size: int) -> None:
    """copy_file_range: no round trip of the data through Python."""
    copied = 0
    while copied < size:
        n = os.copy_file_range(src, dst, size - copied)
        if n == 0:
            raise KernelError("base initramfs changed size while being copied")
        copied += n


def pin_base_initramfs(base: Path, dest: Path) -> Path:
    """``dest``: a machine's own hard link to the cached base archive it was made with.

    The cache drops an archive an hour after a newer ember-init or modules dir
    replaced it (``_prune``); ``ember start`` remakes a machine's initrd from its
    base, and found it gone.  A link costs nothing while the cache keeps the
    archive, and keeps it for the machine after; a copy where links fail."""
    try:
        os.link(base, dest)
    except OSError:
        with open(base, "rb") as src, open(dest, "xb") as out:
            try:
                reflink(src.fileno(), out.fileno())
            except OSError:
                _copy_in_kernel(src.fileno(), out.fileno(), os.fstat(src.fileno()).st_size)
    return dest


def write_machine_initrd(base: Path, runconfig: RunConfig, dest: Path) -> Path:
    """``dest`` = base archive + this machine's config archive (reflink-copied base
    where the file system can, so a machine costs only its config's few hundred bytes)."""
    extra = config_archive(runconfig)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(base, "rb") as src:
            try:
                reflink(src.fileno(), out.fileno())
            except OSError:
                _copy_in_kernel(src.fileno(), out.fileno(), os.fstat(src.fileno()).st_size)
            out.seek(0, os.SEEK_END)
            out.write(extra)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest
