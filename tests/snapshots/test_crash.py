"""kill -9 in the middle of a layer build or a commit; the next run cleans up and succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.home import Home
from ember.snapshots import Kind, Snapshotter
from tests.snapshots.imagekit import Entry, LayerSpec, base_layers, make_image
from tests.snapshots.leaks import ours

pytestmark = [pytest.mark.root, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]

# Prepares an image made by imagekit.  argv: home, image.json, mode, marker file.
# The modes instrument the child (never ember itself) to stop at a chosen point:
#   during-apply  write the marker, then apply the (big) layer: killed while applying
#   after-apply   apply, write the marker, hang: killed with the layer applied, still mounted
#   commit        hang in the rename that publishes a committed snapshot: killed mid-commit
_CHILD = """
import json, logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from ember.home import Home
from ember.images.service import build_image
from ember.oci.config import parse_config
from ember.oci.digest import Digest
from ember.oci.manifest import parse_manifest
from ember.store.content import ContentStore
import ember.unpack
from ember.snapshots.chain import prepare_image

home = Home(Path(sys.argv[1]))
args = json.load(open(sys.argv[2]))
mode, marker = sys.argv[3], Path(sys.argv[4])
store = ContentStore(home.content)
md, cd = Digest.parse(args["manifest"]), Digest.parse(args["config"])
image = build_image(args["reference"], md, parse_manifest(store.read_bytes(md)), cd,
                    parse_config(store.read_bytes(cd)))
real_apply, real_rename = ember.unpack.LayerSession.apply, os.rename
target = args["target"]

def apply_layer(self, root, blob, media_type, diff_id=None, *, opener=None):
    if mode == "during-apply" and str(diff_id) == target:
        marker.write_text("applying")
    stats = real_apply(self, root, blob, media_type, diff_id, opener=opener)
    if mode == "after-apply" and str(diff_id) == target:
        marker.write_text("applied")
        time.sleep(3600)
    return stats

def rename(src, dst, *a, **kw):
    if mode == "commit" and Path(dst).parent.name == "committed" and target in str(dst):
        marker.write_text("committing")
        time.sleep(3600)
    return real_rename(src, dst, *a, **kw)

ember.unpack.LayerSession.apply = apply_layer
os.rename = rename
p = prepare_image(home, image)
print(json.dumps({"built": list(p.built), "path": str(p.path), "snapshot": p.snapshot}))
"""


def _spawn(
    home: Home, tmp: Path, args: dict[str, str], mode: str
) -> tuple[subprocess.Popen[str], Path]:
    script = tmp / "child.py"
    script.write_text(_CHILD)
    (tmp / "image.json").write_text(json.dumps(args))
    marker = tmp / f"marker-{mode}"
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(home.root), str(tmp / "image.json"), mode, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    return proc, marker


def _wait_for(marker: Path, proc: subprocess.Popen[str]) -> None:
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended before the marker: {proc.communicate()[1]}")
        time.sleep(0.01)


def _wait_committed(home: Home, names: list[str], proc: subprocess.Popen[str]) -> None:
    snap = Snapshotter(home, recover=False)
    deadline = time.monotonic() + 60
    while not all(snap.is_committed(name) for name in names):
        if proc.poll() is not None:
            raise AssertionError(f"child ended before committing: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, "the lower layers were never committed"
        time.sleep(0.005)


def _image(home: Home) -> tuple[object, dict[str, str]]:
    big = LayerSpec(
        [Entry("big"), Entry("big/data", random_size=96 << 20, seed=7), Entry("big/small", b"s")]
    )
    image = make_image(home, [*base_layers(), big])
    args = {
        "reference": image.reference,
        "manifest": str(image.manifest_digest),
        "config": str(image.config_digest),
        "target": str(image.layers[-1].diff_id),
    }
    return image, args


@pytest.mark.parametrize("mode", ["during-apply", "after-apply", "commit"])
def test_kill_mid_build_then_next_run_recovers(home: Home, tmp_path: Path, mode: str) -> None:
    image, args = _image(home)
    top = str(image.layers[-1].chain_id)  # type: ignore[attr-defined]
    lower = [str(layer.chain_id) for layer in image.layers[:-1]]  # type: ignore[attr-defined]

    proc, marker = _spawn(
        home, tmp_path, {**args, "target": args["target"] if mode != "commit" else top}, mode
    )
    _wait_for(marker, proc)
    if mode != "commit":
        # the layer below the top commits in a helper thread while the top is being
        # built: kill once that commit is through, in the middle of the top's apply
        _wait_committed(home, lower, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()

    snap = Snapshotter(home, recover=False)
    assert not snap.is_committed(top)  # nothing incomplete was ever committed
    assert all(snap.is_committed(name) for name in lower)
    leftovers = [s.name for s in snap.list() if s.kind is Kind.ACTIVE]
    assert len(leftovers) == 1 and leftovers[0].startswith(f"build/{top}/")
    mounts, _loops = ours(snap.pool.mnt)
    if mode == "after-apply":
        assert mounts, "the killed builder had the snapshot mounted"
    if mode == "commit":
        assert not mounts

    # the next run: a fresh process recovers, then builds the top layer once
    proc2, _ = _spawn(home, tmp_path, args, "none")
    out, err = proc2.communicate(timeout=300)
    assert proc2.returncode == 0, err
    result = json.loads(out)
    assert result["snapshot"] == top
    if mode == "commit":
        # the disk was complete and synced before the commit began: recovery finishes it
        assert f"completed the commit of {top}" in err and result["built"] == []
    else:
        assert "discarded half-built snapshot" in err and result["built"] == [top]
    if mounts:
        assert "unmounted" in err

    snap = Snapshotter(home, recover=False)
    assert not [s.name for s in snap.list() if s.transient]
    assert not list(snap.active_dir.iterdir())
    mounts, loops = ours(snap.pool.root)
    assert mounts == [] and loops == [], (mounts, loops)
    subprocess.run(["e2fsck", "-fn", result["path"]], check=True, capture_output=True)
    with snap.mount(top) as root:
        assert (root / "big/small").read_bytes() == b"s"
        assert (root / "big/data").stat().st_size == 96 << 20
        assert (root / "etc/motd").read_text() == "hello\n"


def test_gc_during_a_build_removes_nothing_it_needs(home: Home, tmp_path: Path) -> None:
    """GC runs while another process is applying the top layer; the build completes."""
    from ember.snapshots.gc import collect

    image, args = _image(home)
    chain = [str(layer.chain_id) for layer in image.layers]  # type: ignore[attr-defined]
    proc, marker = _spawn(home, tmp_path, args, "during-apply")
    _wait_for(marker, proc)
    report = collect(home)  # nothing in the image table: only the build's lease protects it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not set(report.snapshots) & set(chain)
    assert not any(name.startswith("build/") for name in report.snapshots)
    assert not set(report.content) & {str(layer.digest) for layer in image.layers}  # type: ignore[attr-defined]
    snap = Snapshotter(home, recover=False)
    assert all(snap.is_committed(name) for name in chain)
    assert json.loads(out)["built"] == chain


def test_a_killed_prepare_does_not_pin_its_image(home: Home, tmp_path: Path) -> None:
    """kill -9 (or `timeout`'s SIGTERM) left the prepare's 6-hour lease: `image rm` and gc
    then freed nothing for 6 hours.  The lease names its process: gone, it has expired."""
    from ember.snapshots.gc import collect
    from ember.store.content import ContentStore

    image, args = _image(home)
    lower = [str(layer.chain_id) for layer in image.layers[:-1]]  # type: ignore[attr-defined]
    proc, marker = _spawn(home, tmp_path, args, "during-apply")
    _wait_for(marker, proc)
    _wait_committed(home, lower, proc)
    snap = Snapshotter(home, recover=False)
    [lease] = snap.leases.list()
    assert lease.name.startswith("prepare/") and not lease.expired()
    assert lease.owner is not None and lease.owner.pid == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    time.sleep(0.1)
    assert lease.expired(), "a zombie is gone too"
    proc.communicate()
    assert lease.expired() and lease.orphaned()
    assert lease.expires is not None and lease.expires - time.time() > 3600  # not by its TTL

    report = collect(home)  # nothing in the image table: only the lease held the chain
    assert report.leases == [lease.name]
    assert set(lower) <= set(report.snapshots)
    snap = Snapshotter(home, recover=False)
    assert snap.leases.list() == [] and snap.list() == []
    store = ContentStore(home.content)
    assert not any(store.exists(layer.digest) for layer in image.layers)  # type: ignore[attr-defined]
