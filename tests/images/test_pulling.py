"""A pull hands its layers out as they arrive (``ImageService.pulling``)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ember.images import ImageService
from ember.images.cancel import PullCancelled
from ember.images.service import Pulling
from ember.oci.digest import Digest
from ember.registry.client.errors import BlobCorrupt
from ember.store.content import BlobWriter
from ember.unpack import apply_layers
from tests.registry.client.proxy import Behaviour, misbehaving_proxy
from tests.support.cli import ember_env, run_ember
from tests.support.images import layer_digests, push_layout
from tests.support.registry import Registry

EMBER = str(Path(sys.executable).with_name("ember"))


@pytest.fixture(scope="module")
def pushed(registry: Registry, multilayer_layout: Path) -> tuple[str, list[Digest]]:
    push_layout(multilayer_layout, registry, "pulling/multilayer")
    digests = layer_digests(multilayer_layout)
    assert len(set(digests)) >= 3, "the test wants a few distinct layers"
    return "pulling/multilayer", digests


def test_lower_layers_are_handed_out_while_the_top_one_still_downloads(
    service: ImageService, registry: Registry, pushed: tuple[str, list[Digest]]
) -> None:
    repo, digests = pushed
    top = digests[-1]
    with misbehaving_proxy(registry.host, Behaviour(hold_blobs={top.hex})) as proxy:
        with service.pulling(f"{proxy.host}/{repo}", progress=False) as pulled:
            assert [layer.digest for layer in pulled.image.layers] == digests
            first = pulled.layer_path(0)
            assert first.is_file()
            assert not service.content.exists(top)  # held back by the proxy
            assert service.list() == []  # recorded once every blob is in
            proxy.release()
            assert pulled.layer_path(len(digests) - 1).is_file()
        assert [r.reference for r in service.list()] == [f"{proxy.host}/{repo}:latest"]
        assert service.content.exists(pulled.image.manifest_digest)


def test_a_layer_is_read_from_its_first_bytes_while_it_still_downloads(
    service: ImageService, registry: Registry, multilayer_layout: Path,
    pushed: tuple[str, list[Digest]],
) -> None:
    """``open_layer``: the bytes in so far, unverified, before the blob is stored."""
    repo, digests = pushed
    stall = 8192  # the proxy sends this much of every bigger blob, then nothing more
    with (
        misbehaving_proxy(registry.host, Behaviour(stall_blob_after=stall)) as proxy,
        pytest.raises(RuntimeError, match="seen"),
        service.pulling(f"{proxy.host}/{repo}", progress=False) as pulled,
    ):
        layers = pulled.image.layers
        big = max(range(len(layers)), key=lambda i: layers[i].size)
        assert layers[big].size > stall
        head = b""
        with pulled.open_layer(big) as blob:
            while len(head) < stall:
                head += blob.read(stall - len(head))
        expected = (multilayer_layout / "blobs" / "sha256" / digests[big].hex).read_bytes()
        assert head == expected[:stall]
        assert not service.content.exists(digests[big])
        raise RuntimeError("seen")  # ends the pull: its stalled download is cancelled
    assert service.list() == []
    assert not service.content.exists(digests[big])


class LayerWaiter(threading.Thread):
    """Waits for a layer as a root disk's clone does (``ember run``), in a thread of its
    own: through ``open_layer`` (or ``layer_path`` once that says it is stored)."""

    def __init__(self, pulled: Pulling, index: int) -> None:
        super().__init__(daemon=True)
        self.pulled, self.index = pulled, index
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            blob = self.pulled.open_layer(self.index)
            if blob is not None:
                with blob:
                    blob.readall()
        except BaseException as e:
            self.error = e


@pytest.mark.parametrize("how", ["cancel", "leave"])
def test_a_cancelled_pull_ends_the_wait_for_a_layer_the_registry_has_not_answered(
    service: ImageService, registry: Registry, pushed: tuple[str, list[Digest]], how: str
) -> None:
    """A thread waiting for a layer whose request the registry holds ends with the pull
    (``Pulling.cancel``, or the block left with an error), not when the request times
    out (a minute a try): an interrupted `ember run` stayed that long after its
    message, its root disk's clone waiting."""
    repo, digests = pushed
    with misbehaving_proxy(registry.host, Behaviour(hold_blobs={digests[-1].hex})) as proxy:
        with contextlib.suppress(RuntimeError), service.pulling(
            f"{proxy.host}/{repo}", progress=False
        ) as pulled:
            waiter = LayerWaiter(pulled, len(digests) - 1)
            waiter.start()
            deadline = time.monotonic() + 30
            while not proxy.requests(digests[-1].hex):
                assert time.monotonic() < deadline, "the held layer was never asked for"
                time.sleep(0.01)
            if how == "cancel":
                pulled.cancel()
                waiter.join(10)
                assert not waiter.is_alive(), "still waiting for the held layer"
            raise RuntimeError("the caller failed")
        waiter.join(10)
        assert not waiter.is_alive(), "still waiting for the held layer"
        assert isinstance(waiter.error, PullCancelled), waiter.error
    assert service.list() == []


def test_a_caller_failing_before_every_blob_is_in_abandons_the_pull(
    service: ImageService, registry: Registry, pushed: tuple[str, list[Digest]]
) -> None:
    repo, digests = pushed
    with misbehaving_proxy(registry.host, Behaviour(hold_blobs={digests[-1].hex})) as proxy:
        # the held download is let go once the caller has failed: the pull was cancelled
        # meanwhile, so it stores nothing, and nothing may be recorded
        releasing = threading.Timer(0.5, proxy.release)
        with pytest.raises(RuntimeError, match="caller"), service.pulling(
            f"{proxy.host}/{repo}", progress=False
        ) as pulled:
            pulled.layer_path(0)
            releasing.start()
            raise RuntimeError("the caller failed")
        releasing.join()
    assert not service.content.exists(digests[-1])  # cancelled when its answer came
    assert service.list() == []
    assert not service.content.exists(pulled.image.manifest_digest)


def test_a_pull_is_recorded_once_every_blob_is_in_whatever_the_caller_does_next(
    service: ImageService, registry: Registry, pushed: tuple[str, list[Digest]]
) -> None:
    """As ``docker run`` keeps the image it pulled when the container then fails."""
    repo, digests = pushed
    with pytest.raises(RuntimeError, match="caller"), service.pulling(
        f"{registry.host}/{repo}", progress=False
    ) as pulled:
        for i in range(len(digests)):
            pulled.layer_path(i)
        deadline = time.monotonic() + 30
        while not service.list() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("the caller failed")
    assert [r.reference for r in service.list()] == [f"{registry.host}/{repo}:latest"]
    assert service.content.exists(pulled.image.manifest_digest)


def test_a_corrupt_layer_fails_its_turn_and_nothing_is_recorded(
    service: ImageService, registry: Registry, pushed: tuple[str, list[Digest]]
) -> None:
    repo, digests = pushed
    with (
        misbehaving_proxy(registry.host, Behaviour(corrupt_only={digests[-1].hex})) as proxy,
        pytest.raises(BlobCorrupt),
        service.pulling(f"{proxy.host}/{repo}", progress=False) as pulled,
    ):
        assert pulled.layer_path(0).is_file()
        pulled.layer_path(len(digests) - 1)
    assert service.list() == []
    assert not service.content.exists(digests[-1])


def test_a_corrupt_layer_applied_as_it_arrives_fails_as_the_download_does(
    service: ImageService, registry: Registry, multilayer_layout: Path,
    pushed: tuple[str, list[Digest]], tmp_path: Path,
) -> None:
    """Its first byte is wrong, so it is no gzip; but the applier reading it then says why:
    the registry served a corrupt blob (what its digest finds at the end), not a layer
    that is not gzip data."""
    repo, digests = pushed
    blobs = multilayer_layout / "blobs" / "sha256"
    big = max(digests, key=lambda d: (blobs / d.hex).stat().st_size)
    root = tmp_path / "root"
    root.mkdir()
    # sent slowly (~0.5 s for the biggest layer) so that it is read while it arrives
    slow_and_corrupt = Behaviour(corrupt_only={big.hex}, blob_rate=2_000_000)
    with (
        misbehaving_proxy(registry.host, slow_and_corrupt) as proxy,
        pytest.raises(BlobCorrupt, match="corrupt"),
        service.pulling(f"{proxy.host}/{repo}", progress=False) as pulled,
    ):
        layers = pulled.image.layers
        apply_layers(
            root, [(service.layer_path(x), x.media_type, x.diff_id) for x in layers],
            opener=pulled.open_layer,
        )  # fmt: skip
    assert service.list() == []
    assert not service.content.exists(big)


def test_a_config_read_before_it_was_stored_fails_the_pull_if_storing_it_fails(
    service: ImageService, registry: Registry, multilayer_layout: Path,
    pushed: tuple[str, list[Digest]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The config is parsed once it matched its digest, before its fsync and rename:
    an image whose config then could not be stored was recorded all the same (and
    read as damaged ever after)."""
    repo, _digests = pushed
    index = json.loads((multilayer_layout / "index.json").read_text())
    manifest_hex = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((multilayer_layout / "blobs" / "sha256" / manifest_hex).read_text())
    config = Digest.parse(manifest["config"]["digest"])
    store = BlobWriter.commit

    def disk_fails_for_the_config(writer: BlobWriter) -> Digest:
        if writer.expected != config:
            return store(writer)
        writer.verify()
        if writer._observer is not None:  # what commit tells a reader before its fsync
            writer._observer.verified()
        time.sleep(0.5)  # a slow fsync, which then fails: the layers are in by now
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(BlobWriter, "commit", disk_fails_for_the_config)
    with pytest.raises(OSError, match="Input/output"):
        service.pull(f"{registry.host}/{repo}", progress=False)
    assert service.list() == []
    assert not service.content.exists(config)


def test_a_failed_unpack_empties_the_directory_it_was_given(
    tmp_path: Path, registry: Registry, pushed: tuple[str, list[Digest]]
) -> None:
    """Layers are applied as their bytes arrive: what a failed unpack wrote (here the
    lower layers, and maybe part of the corrupt one) must not stay in a directory that
    existed before, as it stays in none the command made."""
    repo, digests = pushed
    target = tmp_path / "rootfs"
    target.mkdir()
    with misbehaving_proxy(registry.host, Behaviour(corrupt_only={digests[-1].hex})) as proxy:
        proc = run_ember(
            "image", "unpack", f"{proxy.host}/{repo}", str(target),
            env=ember_env(tmp_path / "home", EMBER_AGENT="0"), timeout=120,
        )  # fmt: skip
    assert proc.returncode != 0 and "corrupt" in proc.stderr, proc.stderr
    assert target.is_dir() and list(target.iterdir()) == []


def test_unpack_of_an_image_with_a_corrupt_layer_fails_cleanly(
    tmp_path: Path, registry: Registry, pushed: tuple[str, list[Digest]]
) -> None:
    repo, digests = pushed
    env = {**os.environ, "EMBER_HOME": str(tmp_path / "home"), "EMBER_AGENT": "0"}
    target = tmp_path / "rootfs"
    with misbehaving_proxy(registry.host, Behaviour(corrupt_only={digests[-1].hex})) as proxy:
        proc = subprocess.run(
            [EMBER, "image", "unpack", f"{proxy.host}/{repo}", str(target)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.startswith("ember: ") and "corrupt" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not target.exists()  # created by the command, removed again
    listed = subprocess.run(
        [EMBER, "image", "ls", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert json.loads(listed.stdout) == []
