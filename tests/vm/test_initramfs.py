"""The initramfs: module resolution through modules.dep, the cached base archive
with the real Debian kernel's modules, the per-machine config archive."""

from __future__ import annotations

import lzma
import os
import subprocess
import time
from pathlib import Path

import pytest

from ember.home import Home
from ember.vm.errors import InitNotBuilt, KernelError, ModuleNotFoundInKernel
from ember.vm.initramfs import (
    REQUIRED_MODULES,
    ModuleIndex,
    _may_strip,
    base_initramfs,
    config_archive,
    extra_modules,
    find_init,
    module_name,
    pin_base_initramfs,
    read_module,
    strip_signature,
    write_machine_initrd,
)
from ember.vm.kernel import KernelInfo
from ember.vm.runconfig import RunConfig

DEP = """\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/crypto/crc32c-generic.ko.xz:
kernel/a.ko: kernel/b.ko
kernel/b.ko: kernel/a.ko
"""


def test_module_names_normalised() -> None:
    assert module_name("kernel/crypto/crc32c-generic.ko.xz") == "crc32c_generic"
    assert module_name("x/virtio_blk.ko") == "virtio_blk"


def test_load_order_puts_dependencies_first_once() -> None:
    idx = ModuleIndex.parse(DEP)
    order = idx.load_order(["virtio_blk", "ext4", "crc32c-generic"])
    assert order == [
        "virtio_ring", "virtio", "virtio_blk", "crc16", "mbcache", "jbd2", "ext4",
        "crc32c_generic",
    ]  # fmt: skip
    assert idx.paths["crc32c_generic"] == "kernel/crypto/crc32c-generic.ko.xz"


def test_builtin_modules_are_skipped() -> None:
    idx = ModuleIndex.parse(DEP, "kernel/drivers/virtio/virtio_mmio.ko\n")
    assert idx.load_order(["virtio_mmio", "virtio_blk"]) == ["virtio_ring", "virtio", "virtio_blk"]


def test_missing_and_cyclic_modules_refused() -> None:
    idx = ModuleIndex.parse(DEP)
    with pytest.raises(ModuleNotFoundInKernel, match="nope"):
        idx.load_order(["nope"])
    assert idx.load_order(["ext4"], ["nope"]) == ["crc16", "mbcache", "jbd2", "ext4"]
    with pytest.raises(KernelError, match="cycle"):
        idx.load_order(["a"])


def test_compressed_modules_are_decompressed(tmp_path: Path) -> None:
    elf = b"\x7fELF" + os.urandom(1000)
    p = tmp_path / "m.ko.xz"
    p.write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    assert read_module(p) == elf
    p.write_bytes(b"\xfd7zXZ\x00garbage")
    with pytest.raises(KernelError, match="corrupt"):
        read_module(p)


def test_corrupt_gzip_and_zstd_modules_are_errors_not_tracebacks(tmp_path: Path) -> None:
    """zlib.error and ZstdError are not OSErrors: a bad --kernel-modules file was a
    traceback."""
    import gzip

    import zstandard

    elf = b"\x7fELF" + os.urandom(1000)
    packed = {"m.ko.gz": gzip.compress(elf), "m.ko.zst": zstandard.ZstdCompressor().compress(elf)}
    for name, data in packed.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert read_module(p) == elf
        # a bad deflate block type; a frame that names a dictionary it was not given
        p.write_bytes(data[:10] + b"\xff" * 8 if name.endswith(".gz") else data[:5] + b"\xff\xff\xff\xff" + data[9:])
        with pytest.raises(KernelError, match=f"module {p} is corrupt"):
            read_module(p)


def test_find_init(tmp_path: Path, ember_init: Path) -> None:
    assert find_init() == ember_init
    with pytest.raises(InitNotBuilt, match="make init"):
        find_init(tmp_path / "missing")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A private home: archives are written to its kernels/initramfs, not the shared cache."""
    return Home(tmp_path_factory.mktemp("initramfs-home"))


def _cpio_list(data: bytes) -> list[str]:
    out = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True)
    return out.stdout.decode().split()


def test_base_archive_with_the_real_kernel(
    home: Home, kernel: KernelInfo, ember_init: Path, tmp_path: Path
) -> None:
    path = base_initramfs(home, kernel)
    data = path.read_bytes()
    names = _cpio_list(data)
    assert names[:8] == ["dev", "proc", "sys", "newroot", "ember", "ember/modules", "dev/console",
                         "init"]  # fmt: skip
    subprocess.run(
        ["cpio", "-i", "--quiet", "--make-directories"], input=data, cwd=tmp_path, check=True
    )
    assert (tmp_path / "init").read_bytes() == ember_init.read_bytes()
    order = (tmp_path / "ember" / "modules" / "order").read_text().split()
    for required in REQUIRED_MODULES:
        assert required in order
    assert order.index("virtio_ring") < order.index("virtio_mmio")
    assert order.index("jbd2") < order.index("ext4")
    assert "vsock" not in order  # shipped, loaded only on request
    shipped = {p.name for p in (tmp_path / "ember" / "modules").glob("*.ko")}
    assert {f"{n}.ko" for n in order} <= shipped
    assert "vmw_vsock_virtio_transport.ko" in shipped
    for ko in (tmp_path / "ember" / "modules").glob("*.ko"):
        assert ko.read_bytes()[:4] == b"\x7fELF"
    # cached: the second call reuses the file, untouched (its mtime is in the key of
    # the templates made with it)
    mtime = path.stat().st_mtime_ns
    assert base_initramfs(home, kernel) == path
    assert path.stat().st_mtime_ns == mtime


def test_base_archive_changes_with_init(
    home: Home, kernel: KernelInfo, ember_init: Path, tmp_path: Path
) -> None:
    other = tmp_path / "ember-init"
    other.write_bytes(ember_init.read_bytes() + b"\0")
    assert base_initramfs(home, kernel, other) != base_initramfs(home, kernel)


def test_kernel_without_modules(home: Home, kernel: KernelInfo, tmp_path: Path) -> None:
    bare = KernelInfo(vmlinuz=None, vmlinux=kernel.vmlinux, modules_dir=None, version="custom-x")
    names = _cpio_list(base_initramfs(home, bare).read_bytes())
    assert [n for n in names if n.endswith(".ko")] == []
    assert extra_modules(bare, ["vmw_vsock_virtio_transport"]) == ()


def test_extra_modules_for_vsock(kernel: KernelInfo) -> None:
    extra = extra_modules(kernel, ["vmw_vsock_virtio_transport"])
    assert extra[-1] == "vmw_vsock_virtio_transport"
    assert "vsock" in extra and "virtio_ring" not in extra
    with pytest.raises(ModuleNotFoundInKernel, match="not in the initramfs"):
        extra_modules(kernel, ["btrfs"])
    RunConfig(argv=("/x",), modules=extra)  # valid module names for the config


def test_machine_initrd_is_base_plus_config(home: Home, kernel: KernelInfo, tmp_path: Path) -> None:
    rc = RunConfig(argv=("/bin/echo", "hi there"), hostname="m1")
    base = base_initramfs(home, kernel)
    dest = write_machine_initrd(base, rc, tmp_path / "m1" / "initrd")
    assert dest.read_bytes() == base.read_bytes() + config_archive(rc)
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(
        ["cpio", "-i", "--quiet", "--make-directories"],
        input=config_archive(rc),
        cwd=extract,
        check=True,
    )
    config = extract / "ember" / "config"
    assert RunConfig.parse(config.read_bytes()) == rc
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in dest.parent.iterdir()] == ["initrd"]  # no temp file left


def test_signatures_stripped_for_a_kernel_that_does_not_force_them(
    home: Home, kernel: KernelInfo, tmp_path: Path
) -> None:
    assert kernel.modules_dir is not None
    idx = ModuleIndex.parse((kernel.modules_dir / "modules.dep").read_text())
    signed = read_module(kernel.modules_dir / idx.paths["ext4"])
    assert signed.endswith(b"~Module signature appended~\n")  # Debian signs its modules
    plain = strip_signature(signed)
    assert plain[:4] == b"\x7fELF" and len(plain) < len(signed)
    assert signed.startswith(plain)
    assert strip_signature(plain) == plain
    data = base_initramfs(home, kernel).read_bytes()
    subprocess.run(
        ["cpio", "-i", "--quiet", "--make-directories"], input=data, cwd=tmp_path, check=True
    )
    assert (tmp_path / "ember" / "modules" / "ext4.ko").read_bytes() == plain


def test_signatures_kept_when_forced_or_unknown(kernel: KernelInfo, tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF")
    k = KernelInfo(None, tmp_path / "vmlinux", kernel.modules_dir, "x")
    assert not _may_strip(k)  # no config next to the kernel: keep signatures
    (tmp_path / "config").write_text("CONFIG_MODULES=y\nCONFIG_MODULE_SIG_FORCE=y\n")
    assert not _may_strip(k)
    (tmp_path / "config").write_text("CONFIG_MODULES=y\n# CONFIG_MODULE_SIG_FORCE is not set\n")
    assert _may_strip(k)


@pytest.mark.parametrize(
    "bad",
    [
        b"~Module signature appended~\n",
        b"\x7fELF" + b"\0" * 8 + (10**6).to_bytes(4, "big") + b"~Module signature appended~\n",
    ],
)
def test_bad_signature_trailers_refused(bad: bytes) -> None:
    with pytest.raises(KernelError):
        strip_signature(bad)


def test_stale_archives_of_the_same_kernel_are_pruned(
    kernel: KernelInfo, ember_init: Path, tmp_path: Path
) -> None:
    home = Home(tmp_path / "home")
    first = base_initramfs(home, kernel)
    other = tmp_path / "ember-init"
    other.write_bytes(ember_init.read_bytes() + b"\0")
    # an archive built long ago for an older init, and one for another kernel
    stale = first.parent / f"{kernel.version}-0000000000000000.cpio"
    stale.write_bytes(b"old")
    foreign = first.parent / "5.10.0-1-amd64-0000000000000000.cpio"
    foreign.write_bytes(b"old")
    killed = first.parent / f".{kernel.version}-1111111111111111.cpio.abc.tmp"
    killed.write_bytes(b"half")
    hour_ago = time.time() - 2 * 3600
    for p in (stale, foreign, killed):
        os.utime(p, (hour_ago, hour_ago))
    second = base_initramfs(home, kernel, other)
    assert second != first
    assert not stale.exists() and not killed.exists()
    assert first.exists()  # recent: a machine may be copying it right now
    assert foreign.exists()


def test_an_archive_in_use_is_not_pruned_however_old(
    kernel: KernelInfo, ember_init: Path, tmp_path: Path
) -> None:
    """An archive is never touched when used (its mtime is in the template shape's key):
    judged by when it was built, the one in use was pruned whenever another of its
    kernel version was built (another ember-init: EMBER_INIT), built again (a new
    mtime: every template of it stale), and an `ember run` between its cache hit and
    its pin failed."""
    home = Home(tmp_path / "home")
    first = base_initramfs(home, kernel)
    hour_ago = time.time() - 2 * 3600
    os.utime(first, (hour_ago, hour_ago))
    built = first.stat().st_mtime_ns
    assert base_initramfs(home, kernel) == first  # in use: a cache hit
    assert first.stat().st_mtime_ns == built  # (still not touched)
    other = tmp_path / "ember-init"
    other.write_bytes(ember_init.read_bytes() + b"\0")
    second = base_initramfs(home, kernel, other)
    assert second != first and first.exists()
    # unused for an hour: pruned, with the mark of its use
    marks = list(first.parent.glob("*.used"))
    assert marks
    for p in (first, *marks):
        os.utime(p, (hour_ago, hour_ago))
    third = tmp_path / "ember-init-3"
    third.write_bytes(ember_init.read_bytes() + b"\0\0")
    base_initramfs(home, kernel, third)
    assert not first.exists() and not Path(f"{first}.used").exists()
    assert second.exists()  # just built


def test_a_machine_keeps_the_base_archive_it_was_made_with(
    kernel: KernelInfo, ember_init: Path, tmp_path: Path
) -> None:
    """An archive of an older ember-init is pruned an hour after a newer one is built;
    `ember start` remakes a machine's initrd from its base and refused every machine
    made before ("kernel files are gone").  Each machine now links its own."""
    home = Home(tmp_path / "home")
    first = base_initramfs(home, kernel)
    machine_dir = home.root / "machine"
    machine_dir.mkdir()
    pinned = pin_base_initramfs(first, machine_dir / "base.initrd")
    content = first.read_bytes()
    hour_ago = time.time() - 2 * 3600
    os.utime(first, (hour_ago, hour_ago))
    other = tmp_path / "ember-init"
    other.write_bytes(ember_init.read_bytes() + b"\0")
    assert base_initramfs(home, kernel, other) != first
    assert not first.exists()  # pruned
    assert pinned.read_bytes() == content
