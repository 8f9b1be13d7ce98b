"""The session child forked ahead (``fork_spare_session``): the next apply uses it
instead of forking, once; a dead one is passed over."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest

from ember.process import reap_exiting
from ember.unpack import InvalidLayer, LayerSession, apply_layers, sandbox
from tests.unpack.conftest import own_children
from tests.unpack.layers import Layers, reg, tar_bytes


def _no_fork() -> int:
    raise AssertionError("forked although a spare applier child was waiting")


def _outside(pid: int, root: Path) -> bool:
    """Process ``pid`` has no root or working directory in ``root`` (or is gone)."""
    try:
        return all(os.readlink(f"/proc/{pid}/{what}") == "/" for what in ("root", "cwd"))
    except (FileNotFoundError, ProcessLookupError):
        return True


def _fork_spare() -> tuple[frozenset[int], int]:
    """This process's children before, and the spare's pid."""
    reap_exiting()  # an earlier test's appliers, still exiting (reap_later)
    children = own_children()
    sandbox.fork_spare_session()
    (spare,) = own_children() - children
    return children, spare


def test_the_next_apply_runs_in_the_spare_and_forks_nothing(
    root: Path, layers: Layers, monkeypatch: pytest.MonkeyPatch
) -> None:
    children, spare = _fork_spare()
    with monkeypatch.context() as m:
        m.setattr(os, "fork", _no_fork)
        first = layers.blob(tar_bytes([reg("a", b"1")]), "gzip")
        second = layers.blob(tar_bytes([reg("b", b"2")]), "zstd")
        stats = apply_layers(root, [first, second])
    assert stats.layers == 2 and (root / "a").read_bytes() == b"1"
    assert (root / "b").read_bytes() == b"2"
    # It left the root before apply_layers returned (it could be a mount to unmount),
    # and was told to exit; reaped off the caller's path (its exit takes ~3 ms).
    assert _outside(spare, root)
    reap_exiting()
    assert own_children() == children  # the spare applied both layers, then went
    assert not os.path.exists(f"/proc/{spare}")
    # taken once: the next apply forks its own child again
    apply_layers(root, [layers.blob(tar_bytes([reg("c", b"3")]), "gzip")])
    assert (root / "c").exists()


def test_a_failure_in_the_spare_is_reported_like_any_other(root: Path, layers: Layers) -> None:
    children, _ = _fork_spare()
    good = layers.blob(tar_bytes([reg("a", b"1")]), "gzip")
    bad = layers.blob(tar_bytes([reg(".wh.", b"")]), "gzip")
    with pytest.raises(InvalidLayer, match="layer"):
        # the failing layer's successors are queued in the spare's socket already
        apply_layers(root, [good, bad, good, good])
    assert own_children() == children


def test_a_dead_spare_is_passed_over(root: Path, layers: Layers) -> None:
    children, spare = _fork_spare()
    os.kill(spare, signal.SIGKILL)
    os.waitid(os.P_PID, spare, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped
    apply_layers(root, [layers.blob(tar_bytes([reg("a", b"1")]), "gzip")])
    assert (root / "a").exists()
    assert own_children() == children


def test_a_layer_session_adopts_the_spare(
    tmp_path: Path, layers: Layers, monkeypatch: pytest.MonkeyPatch
) -> None:
    children, spare = _fork_spare()
    roots = [tmp_path / "r1", tmp_path / "r2"]
    with LayerSession() as session, monkeypatch.context() as m:
        m.setattr(os, "fork", _no_fork)
        for i, r in enumerate(roots):
            r.mkdir()
            session.apply(r, *layers.blob(tar_bytes([reg("f", str(i).encode())]), "gzip"))
            assert session._session._pid == spare
    assert [(r / "f").read_bytes() for r in roots] == [b"0", b"1"]
    reap_exiting()
    assert own_children() == children


def test_a_spare_killed_with_layers_queued_is_an_unpack_error(root: Path, layers: Layers) -> None:
    """Its socket then reads ECONNRESET (commands unread): reported from its wait
    status like any applier that dies, not raised as an OSError."""
    from ember.unpack import UnpackError

    children, spare = _fork_spare()
    blob = layers.blob(tar_bytes([reg("a", b"1")]), "gzip")

    def kill_first(i: int) -> io.RawIOBase:  # runs once every layer's command was sent
        if i == 0:
            os.kill(spare, signal.SIGKILL)
            os.waitid(os.P_PID, spare, os.WEXITED | os.WNOWAIT)
        return open(blob[0], "rb", buffering=0)

    with pytest.raises(UnpackError, match="killed by signal 9"):
        apply_layers(root, [blob, blob, blob], opener=kill_first)
    assert own_children() == children
