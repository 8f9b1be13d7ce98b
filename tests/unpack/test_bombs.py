"""Decompression bombs: each layer's budget of uncompressed bytes, and the bytes after
the end of an archive (hashed for the DiffID, not applied).

The budget is made small here (``small_budget``) so that no test inflates more than a
few MiB; the reasoning behind the real one is at ``compression.EXPANSION_LIMIT``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from ember.oci.digest import Digest
from ember.unpack import DiffIDMismatch, InvalidLayer, LayerSession, apply_layers
from ember.unpack import compression as compression_module
from ember.unpack.compression import ExpansionLimit
from ember.unpack.tarstream import TRAILER_ALLOWANCE
from tests.unpack.conftest import ApplierChild, own_children
from tests.unpack.layers import Layers, reg, tar_bytes

pytestmark = pytest.mark.usefixtures("each_applier_child")

FLOOR = 4 << 20
SMALL = ExpansionLimit(ratio=128, floor=FLOOR)
#: 16 MiB of zeros: ~530 bytes of zstd, ~73 KB of gzip -1 (at most 9.4 MB at 128x)
ZEROS = 16 << 20
BOMB = r"layer layer1 expands to more than \d+ bytes \(compressed \d+\): refused as a decompression bomb"


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression_module, "EXPANSION_LIMIT", SMALL)


def _clean(each_applier_child: ApplierChild) -> None:
    """What a failed apply leaves of ours: nothing open, no child."""
    assert frozenset(os.listdir("/proc/self/fd")) == each_applier_child.fds_before
    assert own_children() == each_applier_child.children_before


@pytest.mark.usefixtures("small_budget")
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_zeros_in_a_file_past_the_budget_are_refused(
    compression: str, root: Path, layers: Layers, each_applier_child: ApplierChild
) -> None:
    """Aligned zero blocks become holes: a file of them costs no disk, only inflating
    and hashing, ~32000x the blob's size with zstd."""
    bomb = layers.blob(tar_bytes([reg("a", b"1"), reg("zeros", bytes(ZEROS))]), compression)
    after = layers.blob(tar_bytes([reg("b", b"2")]), compression)
    assert bomb[0].stat().st_size * SMALL.ratio < ZEROS
    with pytest.raises(InvalidLayer, match=BOMB):
        apply_layers(root, [bomb, after])
    assert not (root / "b").exists()  # nothing after it, as after any failed layer
    _clean(each_applier_child)


@pytest.mark.usefixtures("small_budget")
def test_bytes_after_the_archive_count_against_the_budget(
    root: Path, layers: Layers, each_applier_child: ApplierChild
) -> None:
    """What follows the end-of-archive blocks is part of the DiffID, so it is read and
    hashed: within the layer's budget only."""
    bomb = layers.blob(tar_bytes([reg("a", b"1")]) + bytes(ZEROS), "zstd")
    with pytest.raises(InvalidLayer, match=BOMB):
        apply_layers(root, [bomb])
    with LayerSession() as session, pytest.raises(InvalidLayer, match=BOMB):
        session.apply(root, *bomb)
    _clean(each_applier_child)


@pytest.mark.usefixtures("small_budget")
def test_a_blob_read_as_it_arrives_is_held_to_the_bytes_received(
    root: Path, layers: Layers, each_applier_child: ApplierChild
) -> None:
    bomb = layers.blob(tar_bytes([reg("zeros", bytes(ZEROS))]), "zstd")
    with pytest.raises(InvalidLayer, match=BOMB):
        apply_layers(root, [bomb], opener=lambda _i: io.FileIO(bomb[0]))
    fine = layers.blob(tar_bytes([reg("data", os.urandom(FLOOR)), reg("zeros", bytes(FLOOR // 2))]), "zstd")
    apply_layers(root, [fine], opener=lambda _i: io.FileIO(fine[0]))
    assert (root / "zeros").stat().st_size == FLOOR // 2
    _clean(each_applier_child)


@pytest.mark.usefixtures("small_budget")
def test_layers_within_their_budget_apply(root: Path, layers: Layers) -> None:
    # below the floor, one budget per layer (together they are over it)
    below = [layers.blob(tar_bytes([reg(f"z{i}", bytes(FLOOR - (64 << 10)))]), "zstd") for i in range(3)]
    stats = apply_layers(root, below)
    assert stats.layers == 3 and (root / "z2").stat().st_size == FLOOR - (64 << 10)
    # a plain tar is its own size
    plain = layers.blob(tar_bytes([reg("zeros", bytes(ZEROS))]), "none")
    apply_layers(root, [plain])
    assert (root / "zeros").stat().st_size == ZEROS
    # at 128x, a compressed layer may go past the floor
    data = os.urandom(FLOOR)
    big = layers.blob(tar_bytes([reg("data", data), reg("zeros", bytes(FLOOR))]), "gzip")
    apply_layers(root, [big])
    assert (root / "data").read_bytes() == data


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_bytes_after_the_archive_are_hashed_not_applied(
    compression: str, root: Path, layers: Layers, each_applier_child: ApplierChild
) -> None:
    """The applier reads a little past the end of the archive (a writer's padding) and
    stops; the rest is hashed for the DiffID on this side, and a layer after it applies."""
    raw = tar_bytes([reg("a", b"1")]) + os.urandom(4 << 20)  # more than the pipe holds
    assert len(raw) > 2 * (1 << 20) + TRAILER_ALLOWANCE
    blob = layers.blob(raw, compression)
    after_raw = tar_bytes([reg("b", b"2")])
    after = layers.blob(after_raw, compression)
    stats = apply_layers(root, [blob, after])
    assert stats.diff_ids == (Digest.of(raw), after[2])
    assert stats.tar_bytes == len(raw) + len(after_raw)
    assert (root / "a").read_bytes() == b"1" and (root / "b").read_bytes() == b"2"
    # all of it is hashed: a DiffID of the archive alone is not the layer's
    archive_only = Digest.of(tar_bytes([reg("a", b"1")]))
    with pytest.raises(DiffIDMismatch):
        apply_layers(root, [(blob[0], blob[1], archive_only), after])
    with LayerSession() as session:
        assert session.apply(root, *blob).tar_bytes == len(raw)
        with pytest.raises(DiffIDMismatch):
            session.apply(root, blob[0], blob[1], archive_only)
    # and read as it arrives
    stats = apply_layers(root, [blob], opener=lambda _i: io.FileIO(blob[0]))
    assert stats.diff_ids == (Digest.of(raw),)
    _clean(each_applier_child)


def test_the_default_budget() -> None:
    """Far above what real layers expand to (a Debian rootfs ~3x, text ~10x), far below
    what runs of zeros give (gzip ~1000x, zstd ~32000x); small layers get the floor."""
    limit = compression_module.EXPANSION_LIMIT
    assert 100 <= limit.ratio <= 200
    assert limit.allowed(30 << 20) == limit.ratio * (30 << 20)
    assert limit.allowed(1 << 10) == limit.floor >= 256 << 20
