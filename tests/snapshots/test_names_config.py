from __future__ import annotations

from pathlib import Path

import pytest

from ember.home import Home
from ember.snapshots import names
from ember.snapshots.config import ConfigError, SnapshotConfig, parse_size
from ember.snapshots.errors import InvalidSnapshotKey


@pytest.mark.parametrize(
    "key",
    ["sha256:" + "a" * 64, "machine/abc", "build/sha256:x/1", "a..b", "x%2Fy", "ünï", "a/../b"],
)
def test_encode_roundtrip_and_safe(key: str) -> None:
    enc = names.encode(key)
    assert "/" not in enc and enc not in (".", "..") and not enc.startswith(".")
    assert names.decode(enc) == key


def test_encode_is_injective_on_lookalikes() -> None:
    assert names.encode("a/b") != names.encode("a%2Fb")
    assert names.encode("a:b") != names.encode("a-b")


@pytest.mark.parametrize(
    "key", ["", ".hidden", "..", "a b", "tab\tkey", "nl\n", "x" * 201, "é" * 150]
)
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidSnapshotKey):
        names.encode(key)


def test_parse_size() -> None:
    assert parse_size("4G") == 4 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size(1 << 30) == 1 << 30
    # the grammar of every other size (ember.sizes): "1.5G" was refused here alone
    assert parse_size("1.5G") == 3 << 29 and parse_size(" 8g ") == 8 << 30
    for bad in ("lots", "1M", -5, True, "4.5k", 1.5, 4097 * 1024 * 16 + 1, "\u0664G", "9000000T", 1 << 70):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_config_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "config.json"
    home = Home(tmp_path)
    assert SnapshotConfig.load(home) == SnapshotConfig()
    f.write_text('{"snapshots": {"backend": "copy", "base_size": "2G", "check": "none"}}')
    cfg = SnapshotConfig.load(home)
    assert (cfg.backend, cfg.base_size, cfg.check) == ("copy", 2 << 30, "none")
    monkeypatch.setenv("EMBER_SNAPSHOT_BACKEND", "reflink")
    assert SnapshotConfig.load(home).backend == "reflink"
    f.write_text('{"snapshots": {"backend": "zfs"}}')
    monkeypatch.delenv("EMBER_SNAPSHOT_BACKEND")
    with pytest.raises(ConfigError, match="^snapshots.backend must be"):
        SnapshotConfig.load(home)
    # a bad override is named as the user set it, not as the file's key
    f.write_text('{"snapshots": {"base_size": "1G"}}')
    monkeypatch.setenv("EMBER_SNAPSHOT_BASE_SIZE", "bogus")
    with pytest.raises(ConfigError, match="^EMBER_SNAPSHOT_BASE_SIZE"):
        SnapshotConfig.load(home)
    monkeypatch.delenv("EMBER_SNAPSHOT_BASE_SIZE")
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        SnapshotConfig.load(home)
    f.write_text('{"snapshots": "copy"}')
    with pytest.raises(ConfigError, match="must be an object"):
        SnapshotConfig.load(home)


def test_check_modes() -> None:
    assert SnapshotConfig().check == "top"  # superblock of every layer, e2fsck -fn of the top
    for mode in ("top", "full", "none"):
        assert SnapshotConfig.from_dict({"check": mode}).check == mode
    with pytest.raises(ConfigError, match="snapshots.check must be one of top, full, none"):
        SnapshotConfig.from_dict({"check": "fast"})


def test_host_reserve() -> None:
    assert SnapshotConfig().host_reserve == 1 << 30
    assert SnapshotConfig.from_dict({"host_reserve": "256M"}).host_reserve == 256 << 20
    for off in (0, "0"):
        assert SnapshotConfig.from_dict({"host_reserve": off}).host_reserve == 0
    for bad in ("lots", -1, "1K", True):
        with pytest.raises(ConfigError, match="host_reserve"):
            SnapshotConfig.from_dict({"host_reserve": bad})
