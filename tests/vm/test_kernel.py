"""The guest kernel: vmlinux extraction from Debian's bzImage, custom kernels,
the installed layout, the command line, and ``ember kernel``."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from ember.cli.main import cli
from ember.home import Home
from ember.vm import kernel as kernel_module
from ember.vm.errors import KernelError, KernelNotFound
from ember.vm.kernel import (
    KernelInfo,
    check_installed_vmlinux,
    extract_vmlinux,
    find_kernel,
    install_kernel,
    list_kernels,
)
from tests.vm.vmm.kernelcache import cached_kernel_home, share_kernels


def test_installed_layout(kernel: KernelInfo) -> None:
    assert kernel.vmlinuz is not None and kernel.vmlinuz.name == "vmlinuz"
    assert kernel.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert kernel.modules_dir is not None
    assert (kernel.modules_dir / "modules.dep").is_file()
    assert kernel.modules_dir.name == kernel.version
    assert (kernel.vmlinux.parent / "config").is_file()


def test_install_is_idempotent() -> None:
    home = cached_kernel_home()
    before = find_kernel(home)
    mtime = before.vmlinux.stat().st_mtime_ns
    again = install_kernel(home)  # apt-cache only: the version is there already
    assert again == before
    assert again.vmlinux.stat().st_mtime_ns == mtime
    assert [k.version for k in list_kernels(home)] == [before.version]


def test_extract_vmlinux_matches_elf_entry(kernel: KernelInfo) -> None:
    assert kernel.vmlinuz is not None
    elf = extract_vmlinux(kernel.vmlinuz.read_bytes())
    assert elf == kernel.vmlinux.read_bytes()
    assert elf[4] == 2  # ELFCLASS64
    assert extract_vmlinux(elf) is elf  # an ELF is already what QEMU wants


def _fake_bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x20F)
    struct.pack_into("<II", img, 0x248, 16, len(payload))
    return bytes(img) + b"\0" * 16 + payload + b"\x00\x01\x02\x03"


def test_extract_vmlinux_gzip_payload() -> None:
    import gzip

    elf = b"\x7fELF" + b"x" * 5000
    assert extract_vmlinux(_fake_bzimage(gzip.compress(elf))) == elf


@pytest.mark.parametrize("compress", ["gzip", "xz", "lzma", "zstd"])
def test_payload_decompression_is_bounded(compress: str) -> None:
    # A payload that inflates past the limit is refused, not decompressed whole.
    import gzip
    import lzma

    import zstandard

    bomb = b"\x7fELF" + b"\0" * (4 << 20)
    packed = {
        "gzip": gzip.compress,
        "xz": lambda b: lzma.compress(b, format=lzma.FORMAT_XZ),
        "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
        "zstd": zstandard.ZstdCompressor().compress,
    }[compress](bomb)
    payload = _fake_bzimage(packed)
    assert extract_vmlinux(payload) == bomb  # under the default limit: whole
    with pytest.raises(KernelError, match="decompresses to more than 1 MiB"):
        kernel_module.decompress_bounded(packed, limit=1 << 20)
    assert kernel_module.decompress_bounded(packed, limit=len(bomb)) == bomb


def test_oversized_kernel_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "vmlinuz"
    with big.open("wb") as f:
        f.truncate(kernel_module.MAX_KERNEL_BYTES + 1)  # sparse: costs no disk, refused unread
    with pytest.raises(KernelError, match="larger than any kernel"):
        find_kernel(Home(tmp_path / "home"), big)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"MZ" + b"\0" * 1000, "not an x86 bzImage"),
        (_fake_bzimage(b"\xfd7zXZ\x00broken"), "corrupt"),
        (_fake_bzimage(b"BZh9unknown"), "not supported"),
        (_fake_bzimage(b"\x1f\x8b" + b"\0" * 20)[:-30], "outside the file"),
    ],
)
def test_extract_vmlinux_refuses_bad_images(data: bytes, message: str) -> None:
    with pytest.raises(KernelError, match=message):
        extract_vmlinux(data)


def test_a_user_kernel_that_is_no_kernel_is_named(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\n")
    with pytest.raises(KernelError, match=f"kernel {passwd}: not an x86 bzImage"):
        find_kernel(Home(tmp_path / "home"), passwd)


def test_payload_must_be_an_elf() -> None:
    import gzip

    with pytest.raises(KernelError, match="ELF"):
        extract_vmlinux(_fake_bzimage(gzip.compress(b"not an elf")))


def test_custom_kernels(kernel: KernelInfo, tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    with pytest.raises(KernelNotFound, match="ember kernel install"):
        find_kernel(home)
    assert kernel.vmlinuz is not None
    custom = find_kernel(home, kernel.vmlinuz)
    assert custom.vmlinux.parent.parent == home.kernels / "custom"
    assert custom.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert custom.modules_dir is None and custom.version.startswith("custom-")
    elf = find_kernel(home, kernel.vmlinux, kernel.modules_dir)
    assert (elf.vmlinux, elf.vmlinuz, elf.modules_dir) == (kernel.vmlinux, None, kernel.modules_dir)
    assert elf.version == kernel.version
    with pytest.raises(KernelNotFound):
        find_kernel(home, tmp_path / "missing")
    with pytest.raises(KernelError, match="modules.dep"):
        find_kernel(home, kernel.vmlinux, tmp_path)


def test_cli_kernel_ls_and_custom_install(kernel: KernelInfo, tmp_path: Path) -> None:
    runner = CliRunner()
    empty = runner.invoke(cli, ["--home", str(tmp_path / "empty"), "kernel", "ls"])
    assert empty.exit_code == 0 and "ember kernel install" in empty.output  # not a bare header
    home = Home(tmp_path / "home")
    share_kernels(home)
    res = runner.invoke(cli, ["--home", str(home.root), "kernel", "ls", "--json"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.output)
    assert [(k["version"], k["default"]) for k in listed] == [(kernel.version, True)]
    res = runner.invoke(
        cli, ["--home", str(home.root), "kernel", "install", "--kernel", str(kernel.vmlinux),
              "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["vmlinux"] == str(kernel.vmlinux)
    # --modules alone was ignored: Debian's kernel was installed, exit 0
    res = runner.invoke(cli, ["--home", str(home.root), "kernel", "install", "--modules", str(tmp_path)])
    assert res.exit_code == 2 and "--modules needs --kernel" in res.output


def test_kernel_from_configuration(kernel: KernelInfo, tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    share_kernels(home)
    home.config_file.write_text(
        json.dumps({"kernel": {"path": str(kernel.vmlinux), "modules": str(kernel.modules_dir)}})
    )
    chosen = find_kernel(home)
    assert (chosen.vmlinux, chosen.vmlinuz, chosen.modules_dir) == (
        kernel.vmlinux,
        None,
        kernel.modules_dir,
    )
    explicit = find_kernel(home, kernel.vmlinux)  # an explicit path wins
    assert explicit.modules_dir is None
    home.config_file.write_text('{"kernel": "nope"}')
    with pytest.raises(KernelError, match="'kernel' must be an object"):
        find_kernel(home)
    home.config_file.write_text("{not json")
    with pytest.raises(KernelError, match="cannot read"):
        find_kernel(home)
    home.config_file.write_text('{"network": {}}')
    assert find_kernel(home).version == kernel.version
    # relative to whatever directory each command ran in: refused
    home.config_file.write_text(json.dumps({"kernel": {"path": "vmlinux"}}))
    with pytest.raises(KernelError, match="'kernel.path' must be an absolute path"):
        find_kernel(home)


@pytest.mark.integration
def test_fresh_install_from_apt(tmp_path: Path) -> None:
    """The whole path on an empty home: apt-get download, dpkg-deb -x, vmlinux, rename."""
    home = Home(tmp_path / "home")
    try:
        # what an install killed half-way leaves behind is removed by the next one
        leftover = home.kernels / ".install-6.1.0-1-amd64.abc123"
        (leftover / "tree").mkdir(parents=True)
        said: list[str] = []
        info = install_kernel(home, progress=said.append)
        assert said and "apt-get download" in said[0]
        assert info.vmlinux.read_bytes()[:4] == b"\x7fELF"
        assert info.vmlinuz is not None and info.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"
        assert info.modules_dir is not None and (info.modules_dir / "modules.dep").is_file()
        assert (home.kernels / "default").resolve() == info.vmlinux.parent
        # nothing half-done left next to it
        assert sorted(p.name for p in home.kernels.iterdir()) == sorted(
            [".install.lock", "default", info.version]
        )
        said.clear()
        assert install_kernel(home, progress=said.append) == info
        assert said == []
        # a vmlinux cut short was taken as installed: reused by install, and `run` got
        # QEMU's "could not load kernel '/proc/self/fd/18': Success"
        with open(info.vmlinux, "r+b") as f:
            f.truncate(info.vmlinux.stat().st_size // 2)
        with pytest.raises(KernelError, match="is damaged: .* is cut short"):
            find_kernel(home)
        assert install_kernel(home, progress=said.append) == info and said
        check_installed_vmlinux(find_kernel(home).vmlinux)
    finally:
        shutil.rmtree(home.root, ignore_errors=True)  # ~450 MB: do not keep it around


def test_an_elf_that_is_no_x86_64_kernel_is_refused(kernel: KernelInfo, tmp_path: Path) -> None:
    """A file that only starts with the ELF magic was registered (and failed at boot)."""
    home = Home(tmp_path / "home")
    real = kernel.vmlinux.read_bytes()
    arm64 = bytearray(real[:4096])
    struct.pack_into("<H", arm64, 18, 183)  # EM_AARCH64
    shared_object = bytearray(real[:4096])
    struct.pack_into("<H", shared_object, 16, 3)  # ET_DYN
    for name, data, message in (
        ("stub", b"\x7fELF", "too short"),
        ("arm64", bytes(arm64), "not an x86-64 ELF"),
        ("library", bytes(shared_object), "not a kernel image"),
    ):
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(KernelError, match=message):
            find_kernel(home, f)


def _elf(segment_end: int) -> bytes:
    """An x86-64 executable ELF header whose one loadable segment ends at ``segment_end``."""
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<HH", head, 16, 2, 62)  # ET_EXEC, EM_X86_64
    struct.pack_into("<Q", head, 32, 64)  # e_phoff
    struct.pack_into("<HH", head, 54, 56, 1)  # e_phentsize, e_phnum
    phdr = bytearray(56)
    struct.pack_into("<IIQ", phdr, 0, 1, 5, 0x1000)  # PT_LOAD at offset 0x1000
    struct.pack_into("<Q", phdr, 32, segment_end - 0x1000)  # p_filesz
    return bytes(head + phdr)


def test_an_installed_kernel_cut_short_is_told_from_a_whole_one(
    kernel: KernelInfo, tmp_path: Path
) -> None:
    check_installed_vmlinux(kernel.vmlinux)  # Debian's, as installed
    whole = tmp_path / "vmlinux"
    whole.write_bytes(_elf(0x3000).ljust(0x3000, b"\0"))
    check_installed_vmlinux(whole)
    for data, message in (
        (b"", "not an ELF"),
        (_elf(0x3000).ljust(0x2000, b"\0"), "cut short"),
        (_elf(0x3000)[:80], "program headers are missing"),
    ):
        whole.write_bytes(data)
        with pytest.raises(KernelError, match=message):
            check_installed_vmlinux(whole)


def test_a_killed_install_takes_its_dpkg_deb_along(tmp_path: Path) -> None:
    """kill -9 of `ember kernel install` left dpkg-deb running, writing on into the temp
    directory that the next install removes, and with it the tar and decompressors it
    writes through."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    from tests.support.proc import poll_until

    home = tmp_path / "home"
    installer = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from ember.home import Home; "
         "from ember.vm.kernel import install_kernel; install_kernel(Home(Path(sys.argv[1])))",
         str(home)],
    )  # fmt: skip

    def processes() -> dict[int, tuple[int, str, str]]:
        """pid -> (parent pid, state, command name) of every process now."""
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    name, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
            except (OSError, ValueError, IndexError):
                continue
            fields = rest.split()
            found[int(pid)] = (int(fields[1]), fields[0], name)
        return found

    def descendants() -> dict[int, str]:
        """The installer's living descendants: pid -> command name."""
        procs, tree, todo = processes(), {}, [installer.pid]
        while todo:
            parent = todo.pop()
            for pid, (ppid, state, name) in procs.items():
                if ppid == parent and state != "Z":
                    tree[pid] = name
                    todo.append(pid)
        return tree

    stopped: dict[int, str] = {}

    def extracting() -> bool:
        # dpkg-deb and what it writes through (tar, decompressors) all started
        tree = descendants()
        if sum(name.startswith("dpkg-deb") for name in tree.values()) < 2 or "tar" not in tree.values():
            return False
        stopped.update(tree)
        return True

    def all_gone() -> bool:
        procs = processes()
        return not any(pid in procs and procs[pid][1] != "Z" for pid in stopped)

    try:
        poll_until(extracting, "the install never ran dpkg-deb's tar", 300)
        for pid in stopped:  # held where they are: none can finish by itself
            os.kill(pid, signal.SIGSTOP)
        installer.send_signal(signal.SIGKILL)
        installer.wait(30)
        poll_until(all_gone, "dpkg-deb, or a process it writes through, outlived the installer", 10)
    finally:
        installer.kill()
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", "--one-file-system", str(home)], check=False)


def test_a_damaged_kernel_fails_its_boot_not_the_listing(tmp_path: Path) -> None:
    """The damage check of a vmlinux was made for every kernel `kernel ls` listed: one
    cut short made the whole listing fail."""
    home = Home(tmp_path / "home")
    version = "6.1.0-9-amd64"
    (home.kernels / version).mkdir(parents=True)
    (home.kernels / version / "vmlinux").write_bytes(_elf(0x3000)[:80])
    (home.kernels / "default").symlink_to(version)
    assert [k.version for k in list_kernels(home)] == [version]
    with pytest.raises(KernelError, match="is damaged"):
        find_kernel(home)


def test_a_merged_usr_packages_modules_are_found(tmp_path: Path) -> None:
    """A package shipping usr/lib/modules (merged /usr) installed "successfully" without
    modules: every machine then failed its boot (no virtio, no ext4)."""
    from ember.vm.kernel import package_modules

    version = "6.12.0-1-amd64"
    assert package_modules(tmp_path, version) is None  # the install refuses it then
    merged = tmp_path / "usr" / "lib" / "modules" / version
    merged.mkdir(parents=True)
    assert package_modules(tmp_path, version) == merged
    classic = tmp_path / "lib" / "modules" / version
    classic.mkdir(parents=True)
    assert package_modules(tmp_path, version) == classic


def test_a_newer_build_of_the_same_abi_name_is_installed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed kernel was kept as long as its ABI name (6.1.0-57-amd64) matched:
    Debian ships fixes as new builds of that name (6.1.192-2, then -3), never taken."""
    home = Home(tmp_path / "home")
    version = "6.1.0-57-amd64"
    vmlinux = home.kernels / version / "vmlinux"
    vmlinux.parent.mkdir(parents=True)
    vmlinux.write_bytes(b"\0" * 64 + b"Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org) "
                        b"(gcc-12) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-10-01)\n\0")  # fmt: skip
    assert kernel_module.installed_package_version(vmlinux) == "6.1.192-2"
    installs: list[str] = []
    pkg = f"linux-image-{version}"
    monkeypatch.setattr(kernel_module, "resolve_debian_version", lambda package: (pkg, version))
    monkeypatch.setattr(kernel_module, "_intact", lambda path: True)
    monkeypatch.setattr(kernel_module, "_load", lambda final, v: v)
    monkeypatch.setattr(kernel_module, "_set_default", lambda home, v: None)
    monkeypatch.setattr(kernel_module, "_install_from_apt", lambda home, p, v: installs.append(p))
    for candidate, again in (("6.1.192-2", False), ("6.1.192-3", True), (None, False)):
        monkeypatch.setattr(kernel_module, "_candidate_version", lambda p, c=candidate: c)
        installs.clear()
        install_kernel(home)
        assert installs == ([pkg] if again else []), candidate
    vmlinux.write_bytes(b"a kernel that names no Debian version")  # kept: nothing to compare
    monkeypatch.setattr(kernel_module, "_candidate_version", lambda p: "6.1.192-3")
    installs.clear()
    install_kernel(home)
    assert installs == []
