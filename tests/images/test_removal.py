"""Removing images: several names of one image, oci: names, and what removal waits for."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest

from ember.images import ImageNotFound, ImageService
from ember.images.errors import AmbiguousImage
from ember.images.sources import parse_source
from tests.registry.client.proxy import Behaviour, misbehaving_proxy
from tests.support.images import copy_layout, layout_ref, push_layout
from tests.support.proc import read_line, wait_flock_blocked
from tests.support.registry import Registry

EMBER = str(Path(sys.executable).with_name("ember"))


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "EMBER_HOME": str(home), "EMBER_AGENT": "0"}


def test_a_digest_with_several_names_is_refused_unless_forced(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """``rm DIGEST`` removed one arbitrary name of the two and said only the digest."""
    copy = copy_layout(busybox_layout, tmp_path / "demo")
    first = service.pull(layout_ref(busybox_layout), progress=False)
    second = service.pull(layout_ref(copy), progress=False)
    assert first.manifest_digest == second.manifest_digest
    names = sorted([first.reference, second.reference])
    short = first.manifest_digest.hex[:12]

    with pytest.raises(AmbiguousImage) as refused:
        service.remove(short)
    message = str(refused.value)
    assert f"{short} is referenced by several names: {', '.join(names)}" in message
    assert "-f/--force" in message
    assert sorted(r.reference for r in service.list()) == names  # nothing removed

    assert sorted(service.remove(short, force=True)) == names
    assert service.list() == []
    assert not service.content.exists(first.manifest_digest)
    assert not any(service.content.exists(layer.digest) for layer in first.layers)


def test_one_name_of_several_goes_alone_and_keeps_the_blobs(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    copy = copy_layout(busybox_layout, tmp_path / "demo")
    image = service.pull(layout_ref(busybox_layout), progress=False)
    service.pull(layout_ref(copy), progress=False)
    assert service.remove(layout_ref(copy)) == [f"oci:{copy}:latest"]
    assert [r.reference for r in service.list()] == [image.reference]
    assert service.content.exists(image.layers[0].digest)


def test_oci_names_are_normalised_lexically(
    service: ImageService, busybox_layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``oci:../busybox`` from /x/sub was recorded as ``oci:/x/sub/../busybox``, which
    ``oci:busybox`` from /x did not find."""
    top = tmp_path / "x"
    copy_layout(busybox_layout, top / "busybox")
    (top / "sub").mkdir()
    (top / "elsewhere").symlink_to(top / "busybox")
    monkeypatch.chdir(top / "sub")
    image = service.pull("oci:../busybox:latest", progress=False)
    assert image.reference == f"oci:{top}/busybox:latest"
    monkeypatch.chdir(top)
    assert parse_source("oci:./sub/../busybox:latest").name == image.reference
    # symlinks are not resolved: another name for the directory is another name
    assert parse_source("oci:elsewhere:latest").name == f"oci:{top}/elsewhere:latest"
    assert service.remove("oci:busybox:latest") == [image.reference]


def test_a_name_recorded_before_normalisation_can_still_be_removed(
    service: ImageService, busybox_layout: Path
) -> None:
    image = service.pull(layout_ref(busybox_layout), progress=False)
    record = service.list()[0]
    old = f"oci:{busybox_layout}/../{busybox_layout.name}:latest"
    service.table.put(
        old, manifest_digest=record.manifest_digest, config_digest=record.config_digest,
        media_type=record.media_type, platform=record.platform, size=record.size,
        index_digest=record.index_digest,
    )  # fmt: skip
    service.remove(image.reference)
    assert service.get(old).manifest_digest == image.manifest_digest
    assert service.remove(old) == [old]
    assert service.list() == []


def test_a_hex_string_that_is_no_image_id_says_so(service: ImageService) -> None:
    with pytest.raises(ImageNotFound) as e:
        service.get("6823913902e4")
    assert str(e.value).startswith("no image in the local store has the ID 6823913902e4")
    assert "docker.io/library" not in str(e.value)


@pytest.mark.integration  # docker-registry, skopeo
def test_removal_does_not_wait_for_a_pull_of_another_image_and_spares_its_blobs(
    service: ImageService,
    registry: Registry,
    busybox_layout: Path,
    sized_layout: Callable[[int], Path],
) -> None:
    """``image rm`` waited for every running pull (images.lock): here one held by the
    registry.  The sized image is busybox plus a layer: the pull found busybox's layer
    in the store and is about to name it, so removing busybox must keep that blob."""
    busybox = service.pull(layout_ref(busybox_layout), progress=False)
    base = busybox.layers[0].digest
    layout = sized_layout(3)
    ref = push_layout(layout, registry, "removal/sized")
    top = _top_layer(layout)
    assert _layers(layout)[0] == base.hex
    failures: list[BaseException] = []
    with misbehaving_proxy(registry.host, Behaviour(hold_blobs={top})) as proxy:
        pulled_ref = ref.replace(registry.host, proxy.host)

        def pull() -> None:
            try:
                ImageService(service.home).pull(pulled_ref, progress=False)
            except BaseException as e:
                failures.append(e)

        puller = threading.Thread(target=pull)
        puller.start()
        deadline = time.monotonic() + 60
        while not proxy.requests(top, "GET"):  # the pull holds its locks and waits
            assert time.monotonic() < deadline and puller.is_alive(), failures
            time.sleep(0.02)
        started = time.monotonic()
        removing = subprocess.run(
            [EMBER, "image", "rm", layout_ref(busybox_layout)],
            env=env_for(service.home.root), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert removing.returncode == 0, removing.stderr
        assert time.monotonic() - started < 10
        assert "waiting" not in removing.stderr
        assert removing.stdout == f"Untagged: {busybox.reference}\n" and not removing.stderr
        assert not service.content.exists(busybox.manifest_digest)
        assert service.content.exists(base)  # claimed by the running pull
        proxy.release()
        puller.join(60)
    assert not failures
    image = service.get(pulled_ref)
    assert all(service.content.exists(layer.digest) for layer in image.layers)


def _layers(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    algorithm, hex_ = index["manifests"][0]["digest"].split(":")
    manifest = json.loads((layout / "blobs" / algorithm / hex_).read_text())
    return [str(layer["digest"]).split(":")[1] for layer in manifest["layers"]]


def _top_layer(layout: Path) -> str:
    return _layers(layout)[-1]


def _hold(path: Path, exclusive: bool = True) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    return fd


def test_a_pull_says_so_when_it_waits_for_ember_gc(
    tmp_path: Path, busybox_layout: Path
) -> None:
    home = tmp_path / "home"
    lock = home / "run" / "images.lock"
    fd = _hold(lock)  # as ember gc holds it while it sweeps
    try:
        proc = subprocess.Popen(
            [EMBER, "image", "pull", layout_ref(busybox_layout)],
            env=env_for(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stderr is not None
        first = read_line(proc.stderr)  # said before it waits: the lock is still held
    finally:
        os.close(fd)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, first + err
    assert first == f"waiting for another ember command to finish (it holds {lock})...\n"


def test_removal_says_so_when_it_waits_for_ember_gc(
    tmp_path: Path, busybox_layout: Path
) -> None:
    home = tmp_path / "home"
    env = env_for(home)
    assert subprocess.run(
        [EMBER, "image", "pull", layout_ref(busybox_layout)], env=env, capture_output=True
    ).returncode == 0
    (home / "snapshots" / "leases").mkdir(parents=True)
    lock = home / "snapshots" / "locks" / "gc.lock"
    fd = _hold(lock)  # the snapshotter's GC lock, which removal reads leases under
    try:
        proc = subprocess.Popen(
            [EMBER, "image", "rm", layout_ref(busybox_layout)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stderr is not None
        first = read_line(proc.stderr)  # said before it waits: the lock is still held
    finally:
        os.close(fd)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, first + err
    assert (first + err).splitlines() == [
        f"waiting for another ember command to finish (it holds {lock})...",
    ]
    assert out == f"Untagged: oci:{busybox_layout}:latest\n"


def test_a_stale_claim_is_ignored_and_cleared(service: ImageService, busybox_layout: Path) -> None:
    """A claim whose holder died (kill -9) protects nothing."""
    image = service.pull(layout_ref(busybox_layout), progress=False)
    claims = service.home.run / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    stale = claims / "1-dead"
    stale.write_text(f"{image.layers[0].digest}\n")  # nobody holds its lock
    service.remove(image.reference)
    assert not service.content.exists(image.layers[0].digest)
    assert not stale.exists()


def test_a_local_image_in_use_keeps_its_blobs_when_removed(
    service: ImageService, busybox_layout: Path
) -> None:
    """``ensuring`` claims a local image's blobs while the caller uses them (unpack)."""
    with service.ensuring(layout_ref(busybox_layout)) as ready:
        pass  # pulled
    with service.ensuring(layout_ref(busybox_layout)) as ready:
        ImageService(service.home).remove(layout_ref(busybox_layout))
        assert ready.layer_path(0).is_file()
    assert service.list() == []


@pytest.mark.root  # a snapshot pool: loop device, mount
@pytest.mark.integration
def test_removal_and_gc_started_together_both_finish(tmp_path: Path, busybox_layout: Path) -> None:
    """`image rm` took claims.lock then gc.lock, `gc` gc.lock then claims.lock: started
    together they could wait for each other for ever (and every pull with them).  The
    race is forced here by holding claims.lock while both line up behind it; with the
    old order about every other run hung."""
    from tests.snapshots.conftest import make_home, teardown_home

    home = make_home(tmp_path / "home")
    env = env_for(home.root)
    image = layout_ref(busybox_layout)
    try:
        for args in (["image", "pull", image], ["image", "prepare", image]):  # a pool: gc takes gc.lock
            assert subprocess.run([EMBER, *args], env=env, capture_output=True).returncode == 0
        for attempt in range(3):
            fd = _hold(home.run / "claims.lock")
            try:
                procs = []
                for args in (["image", "rm", image], ["gc"]):
                    procs.append(subprocess.Popen([EMBER, *args], env=env, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.PIPE, text=True))  # fmt: skip
                    wait_flock_blocked(pid=procs[-1].pid)  # lined up: rm first, then gc
            finally:
                os.close(fd)
            for proc in procs:
                try:
                    _, err = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    for p in procs:
                        p.kill()
                    pytest.fail(f"attempt {attempt}: image rm and gc wait for each other")
                assert proc.returncode == 0, err
            assert subprocess.run([EMBER, "image", "pull", image], env=env,
                                  capture_output=True).returncode == 0  # fmt: skip
    finally:
        teardown_home(home)


def test_name_at_digest_removes_no_name_the_user_did_not_give(
    service: ImageService, busybox_layout: Path
) -> None:
    """`image tag/inspect/run` read NAME@DIGEST as the image of that digest in that
    repository; `image rm NAME@DIGEST` removed every tag of it there."""
    image = service.pull(layout_ref(busybox_layout), progress=False)
    for name in ("demo:1", "demo:2"):
        service.tag(image.reference, name)
    pinned = f"demo:7@{image.manifest_digest}"
    assert service.get(pinned).manifest_digest == image.manifest_digest
    with pytest.raises(ImageNotFound):
        service.remove(pinned, force=True)
    names = {r.reference for r in service.list()}
    assert {"docker.io/library/demo:1", "docker.io/library/demo:2"} <= names


def test_a_whole_id_is_an_id_whatever_names_there_are(
    service: ImageService, busybox_layout: Path, multilayer_layout: Path
) -> None:
    """`sha256:<hex>` names the image with that ID, even where a name of that shape
    (repository sha256, recorded before such names were refused) names another."""
    bb = service.pull(layout_ref(busybox_layout), progress=False)
    ml = service.pull(layout_ref(multilayer_layout), progress=False)
    record = service.table.get(ml.reference)
    assert record is not None
    lookalike = f"docker.io/library/sha256:{bb.manifest_digest.hex}"
    service.table.put(lookalike, manifest_digest=ml.manifest_digest, config_digest=ml.config_digest,
                      media_type=record.media_type, platform=record.platform, size=record.size)  # fmt: skip
    assert service.get(str(bb.manifest_digest)).manifest_digest == bb.manifest_digest


def _damage_row(service: ImageService, reference: str, assignments: str) -> None:
    """Values ember never writes, as an edit or a damaged database file leaves them."""
    import sqlite3

    with sqlite3.connect(service.home.db_path) as conn:
        conn.execute(f"UPDATE images SET {assignments} WHERE reference = ?", (reference,))


def test_removal_spares_the_blobs_of_another_image_whose_record_is_damaged(
    service: ImageService,
    busybox_layout: Path,
    sized_layout: Callable[[int], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``rm`` listed every other record to find the blobs still in use, and the first
    damaged one failed the command half-way: its row deleted, "removed" never said, its
    blobs left.  The damaged record's blobs (the busybox layer too: the other image is
    built on it) are kept; the rest of the removed image's go."""
    base = service.pull(layout_ref(busybox_layout), progress=False)
    other = service.pull(layout_ref(sized_layout(1)), progress=False)
    assert base.layers[0].digest == other.layers[0].digest
    _damage_row(service, other.reference, "created_at = 'yesterday', size = 'big'")

    assert service.remove(base.reference) == [base.reference]
    assert not service.content.exists(base.manifest_digest)
    assert not service.content.exists(base.config_digest)
    for digest in (other.manifest_digest, other.config_digest, *(x.digest for x in other.layers)):
        assert service.content.exists(digest)
    assert f"record of {other.reference} is damaged" in caplog.text
    assert f"ember image rm {other.reference}" in caplog.text  # what to do about it


def test_removal_spares_the_blobs_of_a_record_whose_reference_is_not_text(
    service: ImageService, busybox_layout: Path, sized_layout: Callable[[int], Path]
) -> None:
    """A row whose reference column holds a BLOB was passed over as no record at all:
    the layer it shares with the image removed went with it."""
    base = service.pull(layout_ref(busybox_layout), progress=False)
    other = service.pull(layout_ref(sized_layout(1)), progress=False)
    _damage_row(service, other.reference, "reference = CAST(reference AS BLOB)")

    assert service.remove(base.reference) == [base.reference]
    for digest in (other.manifest_digest, other.config_digest, *(x.digest for x in other.layers)):
        assert service.content.exists(digest)


def test_removal_keeps_every_blob_when_a_damaged_record_names_unknown_blobs(
    service: ImageService,
    busybox_layout: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A damaged record whose manifest digest cannot be read may name any blob: none is
    deleted, and the warning says how to get them collected."""
    copy = copy_layout(busybox_layout, tmp_path / "copy")
    image = service.pull(layout_ref(busybox_layout), progress=False)
    other = service.pull(layout_ref(copy), progress=False).reference
    _damage_row(service, other, "manifest_digest = 'not a digest'")

    assert service.remove(image.reference) == [image.reference]
    assert service.table.get(image.reference) is None
    for digest in (image.manifest_digest, image.config_digest, image.layers[0].digest):
        assert service.content.exists(digest)
    assert f"kept every blob of {image.reference}" in caplog.text
    assert f"ember image rm {other}" in caplog.text and "ember gc" in caplog.text


def test_rm_says_removed_beside_a_damaged_record(tmp_path: Path, busybox_layout: Path) -> None:
    """The command's own output: "Untagged: NAME" and the warning as an ``ember:`` line."""
    from ember.home import Home
    from tests.support.cli import ember_env, run_ember

    home = tmp_path / "home"
    service = ImageService(Home(home))
    copy = copy_layout(busybox_layout, tmp_path / "copy")
    image = service.pull(layout_ref(busybox_layout), progress=False)
    other = service.pull(layout_ref(copy), progress=False).reference
    _damage_row(service, other, "size = 'big'")
    done = run_ember("image", "rm", image.reference, env=ember_env(home, EMBER_AGENT="0"))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert done.stdout == f"Untagged: {image.reference}\n"
    assert any(line.startswith(f"ember: the image table's record of {other}") for line in lines)
    assert service.content.exists(image.layers[0].digest)  # the damaged record names it


def test_a_claim_is_written_whole_or_not_at_all_on_a_full_disk(tmp_path: Path) -> None:
    """``hold`` ignored a short write: on a nearly full disk its claim named only the
    first digests, and an ``image rm`` meanwhile deleted the others under the pull.  A
    claim that cannot be written whole is now an error, and leaves no claim file."""
    from ember.home import Home
    from ember.images.locking import Claims
    from ember.oci.digest import Digest
    from ember.store.errors import StoreError

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        home = Home(mnt / "home")
        claims = Claims(home)
        digests = [Digest.of(str(i).encode()) for i in range(200)]  # ~14 KiB of claim
        with claims.hold(digests[:1]):  # makes run/claims/ and claims.lock while there is room
            pass
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            with suppress(OSError):  # ENOSPC: full
                while os.write(fd, bytes(4096)):
                    pass
        finally:
            os.close(fd)
        os.truncate(filler, filler.stat().st_size - 4096)  # one page left: a short write

        with pytest.raises(StoreError, match="cannot claim the blobs") as e, claims.hold(digests):
            pytest.fail("claimed with a partial claim")
        assert "No space left on device" in str(e.value) and "ember gc" in str(e.value)
        assert list(home.claims.iterdir()) == []

        filler.unlink()
        with claims.hold(digests), claims.frozen() as claimed:
            assert claimed == set(digests)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
