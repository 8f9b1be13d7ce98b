"""The guest kernel: Debian's ``linux-image-amd64`` taken through apt, or one the user brings.

Layout under ``home.kernels``::

    <version>/vmlinuz             the bzImage, as packaged
    <version>/vmlinux             its uncompressed ELF (QEMU boots it through the PVH entry,
                                  skipping the in-guest xz decompressor: ~2x faster under TCG)
    <version>/config, System.map
    <version>/lib/modules/<version>/   modules, with modules.dep (depmod -b if the .deb lacks it)
    default -> <version>          the kernel ``ember run`` uses unless told otherwise
    custom/<sha256>/vmlinux       ELF extracted from a user's bzImage (``--kernel PATH``)

Installs are idempotent and atomic: everything is built in a temp dir next to the
final one and renamed into place, so a kill at any moment leaves either nothing
or a complete kernel.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import lzma
import mmap
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ember.config import config_section
from ember.fsutil import atomic_write, fsync_dir, open_regular, why_unopened
from ember.home import Home
from ember.locks import FileLock
from ember.process import die_with_parent
from ember.vm.errors import KernelError, KernelNotFound

log = logging.getLogger("ember.vm")

META_PACKAGE = "linux-image-amd64"
_VERSION_RE = re.compile(r"^[0-9][A-Za-z0-9.+_-]{0,100}$")
_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class KernelInfo:
    # field order as agreed in the contract: KernelInfo(vmlinuz, vmlinux, modules_dir, version)
    #: the bootable compressed image, if there is one (None for an ELF-only custom kernel)
    vmlinuz: Path | None
    #: uncompressed ELF, booted by QEMU's PVH entry (the fast path)
    vmlinux: Path
    #: ``lib/modules/<version>`` with modules.dep, or None (everything built in)
    modules_dir: Path | None
    version: str

    def to_json(self) -> dict[str, str | None]:
        return {
            "version": self.version,
            "vmlinuz": str(self.vmlinuz) if self.vmlinuz else None,
            "vmlinux": str(self.vmlinux),
            "modules_dir": str(self.modules_dir) if self.modules_dir else None,
        }


# ---- bzImage -> vmlinux (pure) ---------------------------------------------------------


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF kernel inside an x86 bzImage (boot protocol >= 2.08 payload fields)."""
    if bzimage[:4] == _ELF_MAGIC:
        return bzimage
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise KernelError("not an x86 bzImage (no HdrS header) and not an ELF kernel")
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise KernelError(f"bzImage boot protocol {version:#x} is too old to find its payload")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if len(payload) != length or length == 0:
        raise KernelError("bzImage payload lies outside the file")
    elf = decompress_bounded(payload)
    if elf[:4] != _ELF_MAGIC:
        raise KernelError("bzImage payload did not decompress to an ELF kernel")
    return elf


def check_elf_kernel(elf: bytes, where: Path | str) -> None:
    """Refuse an ELF that cannot be an x86-64 kernel (a stub that only starts with the
    magic got registered and failed at boot): 64-bit, little-endian, EM_X86_64, an
    executable with program headers."""
    if len(elf) < 64:
        raise KernelError(f"{where} is too short to be an ELF kernel")
    ei_class, ei_data = elf[4], elf[5]
    e_type, e_machine = struct.unpack_from("<HH", elf, 16)
    (e_phnum,) = struct.unpack_from("<H", elf, 56)
    if ei_class != 2 or ei_data != 1 or e_machine != _EM_X86_64:
        raise KernelError(f"{where} is not an x86-64 ELF (ember boots x86-64 guests)")
    if e_type != _ET_EXEC or e_phnum == 0:
        raise KernelError(f"{where} is an ELF file but not a kernel image (no loadable program)")


_EM_X86_64 = 62
_ET_EXEC = 2
_PT_LOAD = 1


def check_installed_vmlinux(vmlinux: Path) -> None:
    """KernelError unless ``vmlinux`` holds a whole x86-64 kernel ELF: its header checks
    out and the file reaches the end of every loadable segment (an install cut short,
    a file truncated since).  Reads the headers only (a few hundred bytes)."""
    try:
        with open_regular(vmlinux) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(64)
            if head[:4] != _ELF_MAGIC:
                raise KernelError(f"{vmlinux} is not an ELF file")
            check_elf_kernel(head, vmlinux)
            (phoff,) = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            if phentsize < 56 or phnum > 256:
                raise KernelError(f"{vmlinux} has an invalid program header table")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError as e:
        raise KernelError(f"{vmlinux} {why_unopened(e)}") from None
    if len(table) < phentsize * phnum:
        raise KernelError(f"{vmlinux} is cut short (its program headers are missing)")
    for i in range(phnum):
        p_type, _flags, p_offset = struct.unpack_from("<IIQ", table, i * phentsize)
        (p_filesz,) = struct.unpack_from("<Q", table, i * phentsize + 32)
        if p_type == _PT_LOAD and p_offset + p_filesz > size:
            raise KernelError(
                f"{vmlinux} is cut short ({size} bytes; its segments reach {p_offset + p_filesz})"
            )


#: Far above any kernel's size (Debian's vmlinux is ~60 MB, one with debug info
#: a few hundred): a --kernel file, or what its payload decompresses to, past this
#: is refused instead of filling the host's memory.
MAX_KERNEL_BYTES = 1 << 30


def decompress_bounded(
    payload: bytes, limit: int = MAX_KERNEL_BYTES, what: str = "bzImage payload"
) -> bytes:
    """``payload`` (xz, gzip, zstd or lzma, told by its magic) decompressed, at most
    ``limit`` bytes of it; a corrupt or oversized stream is a KernelError about ``what``."""
    # The kernel appends the decompressed size after the stream: decompressors
    # must stop at the end of their stream rather than reject trailing bytes.
    # Each one is asked for at most limit + 1 bytes, so a bomb costs limit, not more.
    try:
        if payload[:6] == b"\xfd7zXZ\x00":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload, limit + 1)
        elif payload[:2] == b"\x1f\x8b":
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload, limit + 1)
        elif payload[:4] == b"\x28\xb5\x2f\xfd":
            out = _unzstd(payload, limit + 1, what)
        elif payload[:3] == b"\x5d\x00\x00":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload, limit + 1)
        else:
            raise KernelError(
                f"{what}: compression {payload[:6].hex()} is not supported (xz, gzip, zstd, lzma)"
            )
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as e:
        raise KernelError(f"{what} is corrupt: {e}") from None
    if len(out) > limit:
        raise KernelError(f"{what} decompresses to more than {limit >> 20} MiB: not something ember boots")
    return out


def _unzstd(payload: bytes, at_most: int, what: str) -> bytes:
    import zstandard  # only zstd kernels pay for the import

    try:
        with zstandard.ZstdDecompressor().stream_reader(payload) as reader:
            return reader.read(at_most)
    except zstandard.ZstdError as e:
        raise KernelError(f"{what} is corrupt: {e}") from None


# ---- Debian's kernel through apt ---------------------------------------------------------


def resolve_debian_version(package: str = META_PACKAGE) -> tuple[str, str]:
    """(versioned package name, kernel version) that ``linux-image-amd64`` depends on."""
    try:
        res = subprocess.run(
            ["apt-cache", "depends", package], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise KernelError(
            "apt-cache not found: ember installs Debian's kernel through apt"
        ) from None
    for line in res.stdout.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-(\S+))\s*$", line)
        if m and _VERSION_RE.fullmatch(m.group(2)) and not m.group(2).endswith("-unsigned"):
            return m.group(1), m.group(2)
    raise KernelError(
        f"apt knows no {package}: {res.stderr.strip() or 'no Depends line'}",
        hint="run apt-get update",
    )


def install_kernel(
    home: Home,
    package: str = META_PACKAGE,
    progress: Callable[[str], None] | None = None,
) -> KernelInfo:
    """Install Debian's current kernel under ``home.kernels`` (no-op if already there).
    ``progress`` hears one line when something is actually downloaded."""
    try:
        pkg, version = resolve_debian_version(package)
    except KernelError:
        # a fresh machine may have no package lists yet: fetch them once, then retry
        _run(["apt-get", "update", "-q"], what="apt-get update")
        pkg, version = resolve_debian_version(package)
    final = home.kernels / version
    # a newer build of the package under the same ABI name (Debian ships fixes so, as
    # 6.1.192-2 and -3 of linux-image-6.1.0-57-amd64): installed again, not kept for ever
    superseded = _superseded(pkg, final / "vmlinux")
    if superseded or not _intact(final / "vmlinux"):
        home.kernels.mkdir(parents=True, exist_ok=True)
        # one installer at a time: a second `ember` waits, then finds the kernel there
        with FileLock(home.kernel_install_lock):
            if not _intact(final / "vmlinux") or _superseded(pkg, final / "vmlinux"):
                _remove_leftovers(home)
                if progress:
                    progress(f"downloading {pkg} (apt-get download) into {home.kernels}")
                _install_from_apt(home, pkg, version)
            info = _load(final, version)
            _set_default(home, version)
        return info
    info = _load(final, version)
    _set_default(home, version)
    return info


#: where Debian's kernel names its package's version: the end of its banner
#: ("Linux version 6.1.0-57-amd64 (...) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3 (2026-11-26)")
_BANNER = re.compile(rb"Linux version [^\n\0]*? Debian ([0-9][A-Za-z0-9.+~:-]*) \(\d{4}-\d\d-\d\d\)")


def installed_package_version(vmlinux: Path) -> str | None:
    """The Debian package version an installed kernel was built as (its banner), None
    when it says none (not a Debian build, or unreadable)."""
    try:
        with open(vmlinux, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            at = m.find(b"Linux version ")
            m_ = _BANNER.match(m[at : at + 512]) if at >= 0 else None
    except (OSError, ValueError):
        return None
    return m_.group(1).decode() if m_ else None


def _candidate_version(pkg: str) -> str | None:
    """The version of ``pkg`` apt would download now (None when it cannot say)."""
    try:
        res = subprocess.run(["apt-cache", "show", "--no-all-versions", pkg],
                             capture_output=True, text=True, check=False)  # fmt: skip
    except OSError:
        return None
    m = re.search(r"^Version:\s*(\S+)\s*$", res.stdout, re.MULTILINE)
    return m.group(1) if m else None


def _superseded(pkg: str, vmlinux: Path) -> bool:
    """Whether apt has another build of the installed kernel's package: a kernel whose
    banner names no version is kept (nothing to compare)."""
    if not vmlinux.is_file():
        return False
    installed = installed_package_version(vmlinux)
    if installed is None:
        return False
    candidate = _candidate_version(pkg)
    return candidate is not None and candidate != installed


def package_modules(tree: Path, version: str) -> Path | None:
    """A kernel package's modules directory in its unpacked ``tree``: ``lib/modules`` or,
    in a merged-/usr package (newer Debian releases, backports), ``usr/lib/modules``."""
    for d in (tree / "lib" / "modules" / version, tree / "usr" / "lib" / "modules" / version):
        if d.is_dir() and not d.is_symlink():
            return d
    return None


def _remove_leftovers(home: Home) -> None:
    """Temp dirs of installs killed half-way (only called under the install lock)."""
    for leftover in home.kernels.glob(".install-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _install_from_apt(home: Home, pkg: str, version: str) -> None:
    home.kernels.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=home.kernels, prefix=f".install-{version}."))
    try:
        dl = tmp / "download"
        dl.mkdir()
        _run(["apt-get", "download", "-q", pkg], cwd=dl, what=f"apt-get download {pkg}")
        debs = list(dl.glob("*.deb"))
        if len(debs) != 1:
            raise KernelError(f"apt-get download {pkg} produced {len(debs)} .deb files")
        tree = tmp / "tree"
        _run(["dpkg-deb", "-x", str(debs[0]), str(tree)], what="dpkg-deb -x")
        out = tmp / "kernel"
        out.mkdir()
        boot = tree / "boot"
        vmlinuz = boot / f"vmlinuz-{version}"
        if not vmlinuz.is_file():
            raise KernelError(f"{pkg} has no boot/vmlinuz-{version}")
        os.replace(vmlinuz, out / "vmlinuz")
        for name, dest in (
            (f"config-{version}", "config"),
            (f"System.map-{version}", "System.map"),
        ):
            if (boot / name).is_file():
                os.replace(boot / name, out / dest)
        mods = package_modules(tree, version)
        if mods is None:
            # installed without them, every machine failed its boot (no virtio, no ext4)
            raise KernelError(f"{pkg} has no lib/modules/{version}: its modules are needed")
        (out / "lib" / "modules").mkdir(parents=True)
        os.replace(mods, out / "lib" / "modules" / version)
        if not (out / "lib" / "modules" / version / "modules.dep").exists():
            _run(["depmod", "-b", str(out), version], what="depmod")
        _write_vmlinux(out / "vmlinuz", out / "vmlinux")
        final = home.kernels / version
        if final.exists():  # a half-finished or damaged earlier install: replace it
            shutil.rmtree(final)
        os.rename(out, final)
        fsync_dir(home.kernels)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_vmlinux(vmlinuz: Path, dest: Path) -> None:
    atomic_write(dest, extract_vmlinux(vmlinuz.read_bytes()), mode=0o644)


def _run(argv: list[str], *, what: str, cwd: Path | None = None) -> None:
    try:
        res = subprocess.run(
            _with_its_children(argv), cwd=cwd, capture_output=True, text=True, check=False,
            # killed with us (kill -9 of `ember kernel install`): a dpkg-deb left running
            # wrote on into the temp dir that the next install removes
            preexec_fn=functools.partial(die_with_parent, os.getpid()),  # noqa: PLW1509
        )  # fmt: skip
    except FileNotFoundError:
        raise KernelError(f"{argv[0]} not found (Debian's apt/dpkg/kmod are needed)") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise KernelError(f"{what} failed: {last}")


def _with_its_children(argv: list[str]) -> list[str]:
    """``argv`` run so that its whole process tree dies with it: as root, in a PID
    namespace of its own (``unshare --pid --kill-child``: the namespace's first process
    goes when unshare does, and the kernel kills the rest), since the parent-death
    signal reaches the direct child only, and ``dpkg-deb -x`` writes through a tar and
    two decompressors of its own.  Otherwise as it is."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return argv
    return ["unshare", "--fork", "--pid", "--kill-child", "--", *argv]


def _set_default(home: Home, version: str) -> None:
    link = home.default_kernel
    try:
        if os.readlink(link) == version:
            return
    except OSError:
        pass
    tmp = link.with_name(f".default.{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(version, tmp)
    os.replace(tmp, link)
    fsync_dir(home.kernels)


def _intact(vmlinux: Path) -> bool:
    if not vmlinux.exists():
        return False
    try:
        check_installed_vmlinux(vmlinux)
    except KernelError as e:
        log.warning("installing the kernel again: %s", e)
        return False
    return True


def _load(d: Path, version: str, *, check: bool = True) -> KernelInfo:
    """The installed kernel in ``d``; ``check``: KernelError if its vmlinux is damaged
    (for booting it, not for listing it)."""
    vmlinux = d / "vmlinux"
    if not vmlinux.is_file():
        raise KernelNotFound(f"kernel {version} is not installed", hint="run: ember kernel install")
    try:
        if check:
            check_installed_vmlinux(vmlinux)
    except KernelError as e:
        # QEMU's own word for it was "could not load kernel '/proc/self/fd/18': Success"
        raise KernelError(
            f"installed kernel {version} is damaged: {e}",
            hint="run: ember kernel install (it installs it again)",
        ) from None
    mods = d / "lib" / "modules" / version
    return KernelInfo(
        version=version,
        vmlinuz=(d / "vmlinuz") if (d / "vmlinuz").is_file() else None,
        vmlinux=vmlinux,
        modules_dir=mods if (mods / "modules.dep").is_file() else None,
    )


def list_kernels(home: Home) -> list[KernelInfo]:
    if not home.kernels.is_dir():
        return []
    out = []
    for d in sorted(home.kernels.iterdir()):
        if (
            d.is_dir()
            and not d.is_symlink()
            and _VERSION_RE.fullmatch(d.name)
            and (d / "vmlinux").is_file()
        ):
            # listed even when damaged: `kernel ls` failed as a whole for one of them
            out.append(_load(d, d.name, check=False))
    return out


def unused_kernels(
    home: Home, booted: Iterable[str], older_than: float, now: float | None = None
) -> list[Path]:
    """The kernel directories nothing needs any more, for ``ember gc``: Debian versions
    other than the default (each ~470 MB with its modules; a new one comes with every
    kernel update) once the default moved away ``older_than`` seconds ago, and the
    ELFs extracted from a user's bzImage (``custom/<sha256>``, ~60 MB) untouched for
    that long, that no machine boots (``booted``: the kernel paths of the machines'
    records; a stopped machine starts again with its own).  None when ``kernels/`` is
    a symlink: its owner shares it between state directories, whose machines these
    records are not all of."""
    kernels = home.kernels
    if kernels.is_symlink() or not kernels.is_dir():
        return []
    now = time.time() if now is None else now
    needed = {Path(os.path.abspath(p)).parent for p in booted}

    def old(path: Path) -> bool:
        try:
            return now - path.lstat().st_mtime >= older_than
        except OSError:
            return False

    found: list[Path] = []
    default = default_version(home)
    if default is not None and old(home.default_kernel):
        found += [
            d for d in sorted(kernels.iterdir())
            if _VERSION_RE.fullmatch(d.name) and d.name != default
            and d.is_dir() and not d.is_symlink() and d not in needed
        ]  # fmt: skip
    custom = home.custom_kernels
    if custom.is_dir() and not custom.is_symlink():
        found += [
            d for d in sorted(custom.iterdir())
            if re.fullmatch(r"[0-9a-f]{64}", d.name) and d.is_dir() and not d.is_symlink()
            and d not in needed and old(d) and old(d / "vmlinux")
        ]  # fmt: skip
    return found


def default_version(home: Home) -> str | None:
    try:
        return os.readlink(home.default_kernel)
    except OSError:
        return None


def configured_kernel(home: Home) -> tuple[Path, Path | None] | None:
    """``{"kernel": {"path": ..., "modules": ...}}`` in ``$EMBER_HOME/config.json``."""
    section = config_section(home, "kernel", KernelError)
    if section is None:
        return None
    if not isinstance(section.get("path"), str):
        raise KernelError(f"{home.config_file}: 'kernel' must be an object with a 'path' string")
    modules = section.get("modules")
    if modules is not None and not isinstance(modules, str):
        raise KernelError(f"{home.config_file}: 'kernel.modules' must be a string")
    for key, value in (("path", section["path"]), ("modules", modules)):
        if value and not os.path.isabs(value):
            # relative to what? (it was the working directory of each command)
            raise KernelError(f"{home.config_file}: 'kernel.{key}' must be an absolute path")
    return Path(section["path"]), Path(modules) if modules else None


def find_kernel(home: Home, path: Path | None = None, modules: Path | None = None) -> KernelInfo:
    """The kernel to boot: ``path`` (a bzImage or ELF the user brings, optionally with its
    ``lib/modules/<version>`` dir), else the one config.json names, else the default
    installed one."""
    if path is None and (configured := configured_kernel(home)) is not None:
        path, modules = configured
    if path is None:
        version = default_version(home)
        if version is None or not _VERSION_RE.fullmatch(version):
            raise KernelNotFound("no kernel installed", hint="run: ember kernel install")
        return _load(home.kernels / version, version)
    return _custom_kernel(home, path, modules)


def _custom_kernel(home: Home, path: Path, modules: Path | None) -> KernelInfo:
    path = path.absolute()
    try:
        with open_regular(path) as f:  # a FIFO would block a plain read
            size = os.fstat(f.fileno()).st_size
            if size > MAX_KERNEL_BYTES:
                raise KernelError(
                    f"kernel {path} is {size >> 20} MiB: larger than any kernel "
                    f"(ember reads at most {MAX_KERNEL_BYTES >> 20} MiB)"
                )
            data = f.read(MAX_KERNEL_BYTES + 1)
    except OSError as e:
        raise KernelNotFound(f"kernel {path} {why_unopened(e)}") from None
    if len(data) > MAX_KERNEL_BYTES:  # it grew after the fstat
        raise KernelError(f"kernel {path} is larger than any kernel")
    digest = hashlib.sha256(data).hexdigest()
    if modules is not None:
        modules = modules.absolute()
        if not (modules / "modules.dep").is_file():
            raise KernelError(f"{modules} has no modules.dep (run depmod, or leave modules out)")
    if data[:4] == _ELF_MAGIC:
        check_elf_kernel(data, path)
        vmlinuz, vmlinux = None, path
    else:
        vmlinuz = path
        vmlinux = home.custom_kernels / digest / "vmlinux"
        if not vmlinux.is_file():
            try:
                payload = extract_vmlinux(data)
            except KernelError as e:
                raise KernelError(f"kernel {path}: {e}") from None
            atomic_write(vmlinux, payload)
    version = modules.name if modules is not None else custom_version(digest)
    return KernelInfo(version=version, vmlinuz=vmlinuz, vmlinux=vmlinux, modules_dir=modules)


def custom_version(digest: str) -> str:
    """The version of a custom kernel given without modules (its sha256's hex)."""
    return f"custom-{digest[:12]}"


def dir_version(home: Home, d: Path) -> str | None:
    """The version the kernel of an installed kernel directory gets (what its cached
    initramfs archives are named after): a Debian version's directory name, or a
    custom ELF's ``custom_version`` (given with modules, it is their directory's name,
    not known from here: None)."""
    if d.parent == home.custom_kernels:
        return custom_version(d.name)
    return d.name if _VERSION_RE.fullmatch(d.name) else None
