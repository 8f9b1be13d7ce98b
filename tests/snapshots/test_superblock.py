"""The superblock check on real ext4 images made by mkfs.ext4 and changed by the kernel and debugfs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ember.snapshots import superblock, system
from tests.snapshots.leaks import ours

pytestmark = [pytest.mark.root, pytest.mark.integration]


def _ext4(path: Path, size: int = 64 << 20, *extra: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-F", "-q", *extra, str(path)], check=True, capture_output=True)
    return path


def _debugfs(image: Path, request: str) -> None:
    subprocess.run(["debugfs", "-w", "-R", request, str(image)], check=True, capture_output=True)


def test_crc32c_matches_the_standard_check_value() -> None:
    # CRC-32C("123456789") is 0xE3069283; the kernel's raw form is its complement
    assert superblock.crc32c_raw(b"123456789") ^ 0xFFFFFFFF == 0xE3069283


def test_fresh_and_cleanly_unmounted_images_pass(tmp_path: Path) -> None:
    image = _ext4(tmp_path / "disk.ext4")
    assert superblock.check_image(image) == []
    target = tmp_path / "mnt"
    target.mkdir()
    dev = system.mount_image(image, target, readonly=False)
    (target / "file").write_bytes(b"x" * 100_000)
    system.unmount(target, device=dev)
    assert superblock.check_image(image) == []
    # without metadata_csum there is no checksum to verify, the rest still is
    plain = _ext4(tmp_path / "plain.ext4", 64 << 20, "-O", "^metadata_csum")
    assert superblock.check_image(plain) == []


def test_image_copied_while_mounted_is_refused(tmp_path: Path) -> None:
    image, target = _ext4(tmp_path / "disk.ext4"), tmp_path / "mnt"
    target.mkdir()
    dev = system.mount_image(image, target, readonly=False)
    try:
        (target / "file").write_text("data\n")
        copy = tmp_path / "copy.ext4"
        subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    finally:
        system.unmount(target, device=dev)
    found = superblock.check_image(copy)
    assert any("journal needs recovery" in p for p in found), found
    assert superblock.check_image(image) == []
    assert ours(tmp_path) == ([], [])


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ("ssv state 0", "not cleanly unmounted"),
        ("ssv state 3", "marked it as having errors"),
        ("ssv state 5", "orphan inodes"),
        ("ssv error_count 2", "2 file system error(s) recorded"),
        ("ssv last_orphan 12", "orphan inode list"),
        ("feature needs_recovery", "journal needs recovery"),
    ],
)
def test_unclean_states_are_refused(tmp_path: Path, request_: str, expected: str) -> None:
    image = _ext4(tmp_path / "disk.ext4")
    _debugfs(image, request_)  # debugfs rewrites the superblock checksum: only the state is bad
    found = superblock.check_image(image)
    assert any(expected in p for p in found), found


def test_damaged_superblock_fails_its_checksum(tmp_path: Path) -> None:
    image = _ext4(tmp_path / "disk.ext4")
    with open(image, "r+b") as f:  # one byte of the volume name, checksum left as it was
        f.seek(1024 + 0x78)
        f.write(b"Z")
    assert superblock.check_image(image) == [
        "the superblock checksum does not match (damaged superblock)"
    ]


def test_truncated_and_foreign_images_are_refused(tmp_path: Path) -> None:
    image = _ext4(tmp_path / "disk.ext4")
    with open(image, "r+b") as f:
        f.truncate(32 << 20)
    assert any("truncated" in p for p in superblock.check_image(image))
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    assert any("not hold an ext4" in p for p in superblock.check_image(junk))
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\0" * 100)
    assert any("too small" in p for p in superblock.check_image(tiny))


def test_needs_recovery(tmp_path: Path) -> None:
    image = _ext4(tmp_path / "disk.ext4")
    assert not superblock.needs_recovery(image)
    _debugfs(image, "feature needs_recovery")
    assert superblock.needs_recovery(image)
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"\0" * 4096)
    assert not superblock.needs_recovery(foreign)
    (tmp_path / "short").write_bytes(b"x")
    assert not superblock.needs_recovery(tmp_path / "short")
